"""Activation shards in object storage: safetensors files + a manifest (shapes, token counts, norm statistics).

Layout under the store URL:
    shard_{key}.safetensors   x [n, L, d], y [n, L, d] (float32 / bfloat16 / int8 with per-row scales), doc, pos
    manifest.json             written last: the list of shards, totals and per-layer mean norms
Shard names derive from the first context index of their batch, so a re-run rewrites the same keys (idempotent).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CTRayError
from ..store.fs import filesystem

MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def _encode(t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "int8":  # symmetric per (token, layer) scale: 4x smaller, ~0.5% error
        scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        return {"q": torch.round(t / scale).to(torch.int8), "scale": scale.float()}
    return {"v": t.to(DTYPES[dtype]).contiguous()}


def _decode(d: dict[str, torch.Tensor], prefix: str, compact: bool = False) -> torch.Tensor:
    """Stored values; `compact` keeps bfloat16 as is (half the memory of a shuffle buffer; cast per batch)."""
    if f"{prefix}.q" in d:
        t = d[f"{prefix}.q"].to(torch.bfloat16 if compact else torch.float32) * d[f"{prefix}.scale"]
        return t
    v = d[f"{prefix}.v"]
    return v if compact and v.dtype == torch.bfloat16 else v.float()


def write_shard(url: str, key: str, x: torch.Tensor, y: torch.Tensor, doc: np.ndarray, pos: np.ndarray,
                dtype: str = "float32") -> dict:
    """Write one shard (single PUT) and return its manifest entry with the sums needed for norm statistics."""
    fs, path = filesystem(url)
    tensors = {f"x.{k}": v for k, v in _encode(x, dtype).items()}
    tensors.update({f"y.{k}": v for k, v in _encode(y, dtype).items()})
    tensors["doc"] = torch.from_numpy(np.asarray(doc, np.int32))
    tensors["pos"] = torch.from_numpy(np.asarray(pos, np.int32))
    name = f"shard_{key}.safetensors"
    fs.makedirs(path, exist_ok=True)
    tmp = f"{path}/.{name}.tmp"
    with fs.open(tmp if _local(fs) else f"{path}/{name}", "wb") as f:
        f.write(st_save(tensors))
    if _local(fs):
        fs.mv(tmp, f"{path}/{name}")
    return {"file": name, "n_tokens": int(x.shape[0]), "x_norm_sum": x.norm(dim=-1).sum(0).tolist(),
            "y_norm_sum": y.norm(dim=-1).sum(0).tolist()}


def _local(fs) -> bool:
    from ..store.fs import is_local

    return is_local(fs)


def write_manifest(url: str, entries: list[dict], meta: dict) -> dict:
    entries = sorted(entries, key=lambda e: e["file"])
    n = sum(e["n_tokens"] for e in entries)
    if n == 0:
        raise CTRayError("harvest produced no tokens")
    x_mean = (np.sum([e["x_norm_sum"] for e in entries], 0) / n).tolist()
    y_mean = (np.sum([e["y_norm_sum"] for e in entries], 0) / n).tolist()
    manifest = {"version": 1, "n_tokens": n, "shards": entries, "x_mean_norm": x_mean, "y_mean_norm": y_mean, **meta}
    fs, path = filesystem(url)
    with fs.open(f"{path}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


class ActivationStore:
    """Reads a persisted harvest. Training re-reads it as many times as it likes."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = filesystem(url)
        try:
            with self.fs.open(f"{self.path}/{MANIFEST}") as f:
                self.manifest = json.load(f)
        except FileNotFoundError as e:
            raise CTRayError(f"no activation manifest at {url} (harvest not finished?)") from e

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def read(self, i: int, compact: bool = False) -> dict[str, torch.Tensor]:
        with self.fs.open(f"{self.path}/{self.shards[i]['file']}", "rb") as f:
            d = st_load(f.read())
        return {"x": _decode(d, "x", compact), "y": _decode(d, "y", compact), "doc": d["doc"], "pos": d["pos"]}
