from .io import load_clt, save_clt, save_transcoder_set
from .transcoder import CrossLayerTranscoder, random_clt

__all__ = ["CrossLayerTranscoder", "random_clt", "load_clt", "save_clt", "save_transcoder_set"]
