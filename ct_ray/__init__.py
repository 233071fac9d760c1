"""ct_ray: circuit tracing of language models (cross-layer transcoders, attribution graphs) on Ray."""

from .attribution.attribute import attribute
from .attribution.graph import Graph
from .clt.io import load_clt, save_clt, save_transcoder_set
from .clt.transcoder import CrossLayerTranscoder, random_clt
from .errors import CTRayError
from .models import LoadedModel, list_builtin, load_model

__version__ = "0.1.0"
__all__ = ["attribute", "Graph", "load_clt", "save_clt", "save_transcoder_set", "CrossLayerTranscoder",
           "random_clt", "CTRayError", "LoadedModel", "list_builtin", "load_model", "__version__"]
