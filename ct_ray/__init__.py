"""ct_ray: circuit tracing of language models (cross-layer transcoders, attribution graphs) on Ray."""

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. ct_ray runs many small matmuls,
# and on a shared CPU (other Ray workers, other jobs) spinning threads steal the core their peer needs: attribution
# of one SmolLM2 prompt with 2 threads and one busy process beside it took 15.5-16.3 s spinning vs 7.7-8.7 s
# passive (benchmarks/RESULTS.md, "OpenMP wait policy"). Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import CTRayError

__version__ = "0.1.0"
# The public API, imported on first use (PEP 562): `import ct_ray.store...` or `ct_ray.analysis...` (the CLI's table
# commands, analysis tasks on Ray workers) then never loads torch and transformers.
from .exports import lazy_exports

_LAZY = {"attribute": ".attribution.attribute", "Graph": ".attribution.graph", "load_clt": ".clt.io",
         "save_clt": ".clt.io", "save_transcoder_set": ".clt.io", "CrossLayerTranscoder": ".clt.transcoder",
         "random_clt": ".clt.transcoder", "LoadedModel": ".models", "list_builtin": ".models", "load_model": ".models"}
__all__ = [*_LAZY, "CTRayError", "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
