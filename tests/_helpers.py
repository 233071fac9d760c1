"""Helpers shared by test modules (fixtures live in conftest.py)."""

import socket
from pathlib import Path


def free_ports(n: int = 1) -> list[int]:
    """n TCP ports on 127.0.0.1 free a moment ago (bound together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def transcoder_set(d: Path, entries=None, d_model: int = 4, **tensors) -> Path:
    """A one-layer `transcoder_set` folder built by hand (3 features; `tensors` replace W_enc/W_dec/b_enc/b_dec),
    `entries` as config.yaml's file list (default: the one file)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    t = {"W_enc": torch.ones(3, d_model), "W_dec": torch.ones(3, d_model), "b_enc": torch.zeros(3),
         "b_dec": torch.zeros(d_model)}
    save_file({**t, **{k: v for k, v in tensors.items() if v is not None}}, d / "layer_0.safetensors")
    (d / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set",
                                                   "transcoders": entries or ["layer_0.safetensors"]}))
    return d


def cut_round(store, sweep_id: str, keys, monkeypatch, committed=(), **committer_kw) -> None:
    """A sweep round of `keys` whose driver dies between its nodes/edges commits and its graphs commit."""
    import pytest

    import ct_ray.store.commit as commit

    from .test_sql import report

    real = commit.commit_files

    def dies_at_graphs(st, name, *a, **kw):
        if name == "graphs":
            raise KeyboardInterrupt
        return real(st, name, *a, **kw)

    monkeypatch.setattr(commit, "commit_files", dies_at_graphs)
    try:
        c = commit.Committer(store, sweep_id, set(committed), **committer_kw)
        c.add(report(store, sweep_id, dict.fromkeys(keys, "ok")))
        with pytest.raises(KeyboardInterrupt):
            c.commit()
    finally:
        monkeypatch.setattr(commit, "commit_files", real)
