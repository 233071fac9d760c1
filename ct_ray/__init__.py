"""ct_ray: circuit tracing of language models (cross-layer transcoders, attribution graphs) on Ray."""

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. ct_ray runs many small matmuls,
# and on a shared CPU (other Ray workers, other jobs) spinning threads steal the core their peer needs: attribution
# of one SmolLM2 prompt with 2 threads and one busy process beside it took 15.5-16.3 s spinning vs 7.7-8.7 s
# passive (benchmarks/RESULTS.md, "OpenMP wait policy"). Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .attribution.attribute import attribute
from .attribution.graph import Graph
from .clt.io import load_clt, save_clt, save_transcoder_set
from .clt.transcoder import CrossLayerTranscoder, random_clt
from .errors import CTRayError
from .models import LoadedModel, list_builtin, load_model

__version__ = "0.1.0"
__all__ = ["attribute", "Graph", "load_clt", "save_clt", "save_transcoder_set", "CrossLayerTranscoder",
           "random_clt", "CTRayError", "LoadedModel", "list_builtin", "load_model", "__version__"]
