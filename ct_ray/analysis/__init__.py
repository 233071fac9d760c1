"""Circuits across prompts: analysis over a sweep's committed tables (no Ray inside; see docs/analysis.md).

- `stats.py` / `run.py`: `feature_stats` and `circuit_paths` of a sweep (`ct-ray analyze`);
- `supernodes.py`: automatic supernodes of one graph and of a sweep;
- `diff.py`: graph diffs between two sweeps (`ct-ray diff`).
"""
