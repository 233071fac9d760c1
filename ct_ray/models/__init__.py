from .adapters import ADAPTERS, Adapter, Norm, adapter_for
from .loading import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, list_builtin, load_model

__all__ = ["ADAPTERS", "Adapter", "Norm", "adapter_for", "BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel",
           "list_builtin", "load_model"]
