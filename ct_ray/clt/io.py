"""CLT files in the circuit-tracer layout, through fsspec, safetensors only (never pickle).

Cross-layer transcoder (`model_kind: cross_layer_transcoder`):
  config.yaml, W_enc_{l}.safetensors {W_enc_{l} [d_tc, d], b_enc_{l} [d_tc], b_dec_{l} [d], threshold_{l} [d_tc]},
  W_dec_{l}.safetensors {W_dec_{l} [d_tc, span_l, d]}; span_l = n_layers - l for a full CLT, 1 per-layer.
Per-layer transcoder set (`model_kind: transcoder_set`): config.yaml's `transcoders` lists one file per layer
  (default `layer_{l}.safetensors`) holding W_enc [d_tc, d], W_dec [d_tc, d], b_enc [d_tc], b_dec [d] and
  optionally `activation_function.threshold` [d_tc] (JumpReLU; ReLU without it).
Sidecar `ct_ray.json`: training spec, metrics, data hash, anything else ct_ray knows.

CLT folders are untrusted input (docs/security.md): every file read is inside the folder (relative names only, no
`..`, symlinks resolved and checked), a safetensors file's size must match its header before its data is read,
config files are small and alias-free YAML, and weights must be finite.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import tempfile

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CLTError, one_line
from ..store.fs import atomic_dir, filesystem, is_local
from .lazy import MappedFile, register
from .transcoder import CrossLayerTranscoder

HOOK_NAMES = {"resid_mid": "hook_resid_mid", "mlp_in": "ln2.hook_normalized"}
HOOK_FROM_NAME = {
    "hook_resid_mid": "resid_mid",
    "resid_mid": "resid_mid",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_in": "mlp_in",
    "mlp_in": "mlp_in",
}


def save_clt(clt: CrossLayerTranscoder, url: str, extra: dict | None = None, **storage_options) -> None:
    """Write `clt` to `url` (a directory) atomically."""
    cfg = {
        "model_name": clt.model_name,
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": HOOK_NAMES[clt.feature_input_hook],
        "feature_output_hook": "hook_mlp_out",
        "activation_function": clt.activation,
    }
    with atomic_dir(url, **storage_options) as (fs, tmp):
        with fs.open(f"{tmp}/config.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        for l in range(clt.n_layers):
            enc = {
                f"W_enc_{l}": clt.W_enc[l].detach().contiguous(),
                f"b_enc_{l}": clt.b_enc[l].detach().contiguous(),
                f"b_dec_{l}": clt.b_dec[l].detach().contiguous(),
            }
            if clt.activation == "jumprelu":
                enc[f"threshold_{l}"] = clt.threshold[l].detach().float().contiguous()
            with fs.open(f"{tmp}/W_enc_{l}.safetensors", "wb") as f:
                f.write(st_save(enc))
            with fs.open(f"{tmp}/W_dec_{l}.safetensors", "wb") as f:
                f.write(st_save({f"W_dec_{l}": clt.W_dec[l].detach().contiguous()}))
        side = {"format": "ct_ray-clt", "version": 1, "n_layers": clt.n_layers, "d_model": clt.d_model,
                "d_transcoder": clt.d_tc, "spans": clt.spans, **(extra or {})}
        with fs.open(f"{tmp}/ct_ray.json", "w") as f:
            json.dump(side, f, indent=1)


MAX_CONFIG_BYTES = 1 << 20  # config.yaml and ct_ray.json: a few KB in practice
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_LAYERS = 1024  # transcoder files in one config (the deepest open models have under 200 layers)


def _confine(fs, root: str, path: str, url: str) -> None:
    """A local file's real path (symlinks resolved) must lie inside the CLT folder and be a regular file."""
    if not is_local(fs):
        return
    real, top = os.path.realpath(path), os.path.realpath(root)
    fname = path.rsplit("/", 1)[-1]
    if os.path.commonpath([real, top]) != top:
        raise CLTError(f"{fname} in {url} points outside the CLT folder")
    if os.path.exists(real) and not os.path.isfile(real):
        raise CLTError(f"{fname} in {url} is not a regular file")


def _small_text(fs, root: str, path: str, url: str) -> str:
    """A small config file's text (FileNotFoundError when absent)."""
    _confine(fs, root, path, url)
    with fs.open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    fname = path.rsplit("/", 1)[-1]
    if len(data) > MAX_CONFIG_BYTES:
        raise CLTError(f"{fname} in {url} is larger than {MAX_CONFIG_BYTES} bytes: not a CLT config")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise CLTError(f"{fname} in {url} is not UTF-8 text") from e


def _fits(shape, pattern) -> bool:
    return isinstance(shape, list) and len(shape) == len(pattern) and all(p is None or s == p for s, p in zip(shape, pattern))


def _header(f, size: int, fname: str, url: str, expect: dict | None) -> tuple[dict, int]:
    """A safetensors file's header and its length, checked: the file's size must match the header, and the header's
    shapes the `expect`ed ones (tensor name -> allowed shapes, None for any size), as far as known."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CLTError(f"corrupt CLT file {fname} in {url}: not a safetensors file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CLTError(f"corrupt CLT file {fname} in {url}: bad safetensors header") from e
    if size != 8 + n + end:
        raise CLTError(f"corrupt CLT file {fname} in {url}: {size} bytes, its header describes {8 + n + end}")
    for key, pats in (expect or {}).items():
        shape = header.get(key, {}).get("shape") if isinstance(header.get(key), dict) else None
        if shape is not None and not any(_fits(shape, p) for p in pats):
            want = " or ".join(str(tuple("*" if x is None else x for x in p)) for p in pats)
            raise CLTError(f"{fname} in {url}: tensor {key!r} has shape {tuple(shape)}, expected {want}")
    return header, n


def _check_finite(tensors: dict[str, torch.Tensor], fname: str, url: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CLTError(f"{fname} in {url}: tensor {k!r} has non-finite values (NaN or inf)")


def _read(fs, path: str, url: str, root: str, expect: dict | None = None, *, maps: list | None = None,
          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read whole after its header is checked (`_header`). With `maps` (a list): a
    file whose tensors are `dtype` already is memory-mapped instead (see `_map`; a remote one is first copied to an
    unnamed local file, `_spool`), and its `MappedFile` (None for a file read whole) appended."""
    fname = path.rsplit("/", 1)[-1]
    _confine(fs, root, path, url)
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            header, n = _header(f, size, fname, url, expect)
            spans = _spans(header, 8 + n, size, dtype) if maps is not None else None
            if spans is not None:
                local = f if is_local(fs) else _spool(f, size, fname, url)
                try:
                    tensors, mapped = _map(local, spans, fname, url)
                finally:
                    if local is not f:
                        local.close()  # the map and the MappedFile's descriptor keep the unnamed copy
                maps.append(mapped)
                return tensors
            if maps is not None:
                maps.append(None)
            f.seek(0)
            data = f.read(size)
    except FileNotFoundError as e:
        raise CLTError(f"CLT file missing: {fname} in {url}") from e
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CLTError(f"corrupt CLT file {fname} in {url}: {one_line(e)}") from e
    _check_finite(tensors, fname, url)
    return tensors


_SPOOL_BLOCK = 8 << 20


def _spool(f, size: int, fname: str, url: str):
    """A remote file copied, a block at a time, into an unnamed temporary file (in $TMPDIR; gone once closed and
    unmapped), so that it can be mapped like a local one: the decoders of an s3:// CLT then never become resident
    either. Set TMPDIR to a disk, not a RAM filesystem, or the copy costs memory after all."""
    try:
        tmp = tempfile.TemporaryFile()
    except OSError as e:
        raise CLTError(f"cannot create a local copy of {fname} of {url} in {tempfile.gettempdir()} (TMPDIR): "
                       f"{one_line(e)}") from None
    try:
        f.seek(0)
        done = 0
        while block := f.read(min(_SPOOL_BLOCK, size - done)):  # errors reading the source are the caller's
            try:
                tmp.write(block)
                done += len(block)
                if done == size:
                    tmp.flush()
            except OSError as e:  # writing the copy: a full or read-only TMPDIR
                raise CLTError(f"cannot copy {fname} of {url} to a local file in {tempfile.gettempdir()} (TMPDIR): "
                               f"{one_line(e)}") from None
        if done != size:
            raise CLTError(f"{fname} in {url}: read {done} of its {size} bytes")
    except BaseException:
        tmp.close()
        raise
    return tmp


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_CHECK_BYTES = 64 << 20  # finiteness is checked this much at a time, each part's pages released after it


def _spans(header: dict, start: int, size: int, dtype) -> dict | None:
    """Where each tensor of a checked header lies in its file, if the file can be memory-mapped as `dtype`
    tensors; None when it does not qualify (another dtype, an unaligned or unusual layout): the caller reads it
    whole, which also reports what is wrong with it."""
    spans = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = _ST_DTYPES.get(v["dtype"]), v["shape"], v["data_offsets"]
            numel = math.prod(shape)
            ok = dt == dtype and all(type(x) is int and x >= 0 for x in (*shape, b, e))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if not ok or e - b != numel * dt.itemsize or (start + b) % dt.itemsize or not 0 <= b <= e <= size - start:
            return None
        spans[k] = (dt, shape, start + b, numel)
    return spans


def _map(f, spans: dict, fname: str, url: str) -> tuple[dict, MappedFile]:
    """The file's tensors as copy-on-write views of a private memory map: pages are read from the file only when
    used, so a decoder whose rows are mostly never touched (attribution gathers the active features' rows) costs
    only what is used. Returns (tensors, the open file: `clt.lazy.decoder_rows` reads rows through it)."""
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writes stay private to this process
    out = {}
    for k, (dt, shape, off, numel) in spans.items():
        out[k] = torch.frombuffer(mm, dtype=dt, count=numel, offset=off).view(shape) if numel else \
            torch.empty(shape, dtype=dt)
        flat = out[k].view(-1)
        step = _CHECK_BYTES // dt.itemsize
        for i in range(0, numel, step):  # every value is checked once, without keeping the whole file resident
            _check_finite({k: flat[i : i + step]}, fname, url)
            _release(mm, off + i * dt.itemsize, min(step, numel - i) * dt.itemsize)
    return out, MappedFile(os.dup(f.fileno()), {k: off for k, (_, _, off, _) in spans.items()})


def _release(mm: mmap.mmap, off: int, n: int) -> None:
    """Drop these bytes' pages from this process's resident set (the kernel's page cache keeps them: the next use
    reads them back from there); a no-op where the platform has no MADV_DONTNEED. Only for pages never written
    (a private map's written pages would be discarded): used while loading."""
    if not hasattr(mmap, "MADV_DONTNEED") or n <= 0:
        return
    lo = off - off % mmap.PAGESIZE
    hi = min(len(mm), off + n)
    hi -= hi % mmap.PAGESIZE if hi < len(mm) else 0  # keep a page shared with the next part (it is rechecked)
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _get(t: dict, key: str, fname: str) -> torch.Tensor:
    if key not in t:
        raise CLTError(f"{fname} has no tensor {key!r} (found: {', '.join(sorted(t)) or 'none'})")
    return t[key]


def load_clt(url: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", lazy_decoders: bool = True,
             **storage_options) -> CrossLayerTranscoder:
    """Load a CLT (circuit-tracer `cross_layer_transcoder` layout) or a per-layer `transcoder_set`.

    `lazy_decoders`: memory-map a cross-layer CLT's decoder files (when stored in `dtype`; a remote CLT's are first
    copied to unnamed local files, in $TMPDIR) instead of reading them, so that only the rows in use become
    resident: attribution touches the active features' rows, a small part of the decoders on short prompts
    (circuit-tracer's `lazy_decoder` serves the same purpose). Every value is still checked for finiteness at load
    time (see clt/lazy.py). Only for a CLT kept on the CPU: one moved to a GPU is read whole."""
    fs, path = filesystem(url, **storage_options)
    try:
        exists = fs.exists(path)
    except Exception as e:  # unreachable storage
        raise CLTError(f"cannot reach {url}: {one_line(e)}") from e
    if not exists:
        raise CLTError(f"no CLT at {url}")
    try:
        text = _small_text(fs, path, f"{path}/config.yaml", url)
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text)):  # no alias expansion from a CLT
            raise CLTError(f"{url}/config.yaml uses YAML aliases (*name): write the values out")
        cfg = yaml.safe_load(text) or {}
    except FileNotFoundError as e:
        raise CLTError(f"{url} has no config.yaml: not a CLT directory") from e
    except yaml.YAMLError as e:
        raise CLTError(f"{url}/config.yaml is not valid YAML") from e
    if not isinstance(cfg, dict):
        raise CLTError(f"{url}/config.yaml is not a mapping")
    kind = cfg.get("model_kind", "cross_layer_transcoder")
    hook_name = cfg.get("feature_input_hook", "hook_resid_mid")
    if hook_name not in HOOK_FROM_NAME:
        raise CLTError(f"unsupported feature_input_hook {hook_name!r} (supported: {', '.join(HOOK_FROM_NAME)})")
    hook = HOOK_FROM_NAME[hook_name]
    if kind == "cross_layer_transcoder":
        # a CLT bound for a GPU is copied there whole: mapping (or spooling) its decoders first would only add a pass
        lazy = lazy_decoders and torch.device(device).type == "cpu"
        clt = _load_cross_layer(fs, path, url, cfg, hook, dtype, lazy)
    elif kind == "transcoder_set":
        clt = _load_transcoder_set(fs, path, url, cfg, hook, dtype)
    else:
        raise CLTError(f"unknown model_kind {kind!r} in {url}/config.yaml")
    clt.source = str(url)
    try:
        clt.meta = json.loads(_small_text(fs, path, f"{path}/ct_ray.json", url))
    except (FileNotFoundError, json.JSONDecodeError):
        clt.meta = {}
    if not isinstance(clt.meta, dict):
        clt.meta = {}
    clt.requires_grad_(False)
    return clt.to(device)


def load_model_and_clt(model: str, clt: str | None = None, random_clt: dict | None = None, *,
                       clt_options: dict | None = None, device: str = "cpu", attn: str = "eager"):
    """The (model, CLT) pair an actor holds: the model by name / directory, and either a CLT URL (`clt`) or a seeded
    random CLT (`random_clt`: the fields of `RandomCLTSpec`, rebuilt identically wherever it is built); checked
    against each other."""
    from ..models import load_model
    from ..specs.common import RandomCLTSpec
    from .transcoder import random_clt as build_random

    if bool(clt) == bool(random_clt):
        raise CLTError("give exactly one of clt (a CLT URL) and random_clt")
    lm = load_model(model, device=device, attn=attn)
    if clt:
        c = load_clt(clt, device=device, **(clt_options or {}))
    else:
        r = RandomCLTSpec.model_validate(random_clt)
        c = build_random(lm, r.features, seed=r.seed, firing_rate=r.firing_rate, span=r.span).to(device)
    c.check_model(lm.n_layers, lm.d_model)
    return lm, c


def _count_layers(fs, path: str, prefix: str) -> int:
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    n = 0
    while f"{prefix}_{n}.safetensors" in names:
        n += 1
    return n


def _load_cross_layer(fs, path, url, cfg, hook, dtype, lazy: bool) -> CrossLayerTranscoder:
    L = _count_layers(fs, path, "W_enc")
    if L == 0:
        raise CLTError(f"{url} has no W_enc_0.safetensors")
    encs, decs, maps = [], [], ([] if lazy else None)
    for l in range(L):
        fname = f"W_enc_{l}.safetensors"
        d0 = encs[0][0].shape[1] if encs else None  # the model width, once layer 0 is read
        t = _read(fs, f"{path}/{fname}", url, path, {f"W_enc_{l}": [(None, d0)], f"b_dec_{l}": [(d0,)]})
        W_enc = _get(t, f"W_enc_{l}", fname)
        d_tc, d = W_enc.shape
        b_enc, b_dec = _get(t, f"b_enc_{l}", fname), _get(t, f"b_dec_{l}", fname)
        thr = t.get(f"threshold_{l}")
        if thr is None and f"log_threshold_{l}" in t:
            thr = t[f"log_threshold_{l}"].exp()
        fname = f"W_dec_{l}.safetensors"
        W_dec = _get(_read(fs, f"{path}/{fname}", url, path, {f"W_dec_{l}": [(d_tc, None, d), (d_tc, d)]},
                           maps=maps, dtype=dtype), f"W_dec_{l}", fname)
        if W_dec.ndim == 2:  # a per-layer decoder stored flat
            W_dec = W_dec[:, None]
        if W_dec.shape[0] != d_tc or W_dec.shape[-1] != d or W_dec.shape[1] > L - l or b_enc.shape != (d_tc,):
            raise CLTError(f"layer {l} of {url}: inconsistent shapes W_enc {tuple(W_enc.shape)}, "
                           f"W_dec {tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}")
        encs.append((W_enc, b_enc, b_dec, thr))
        decs.append(W_dec)
    # as in circuit-tracer, layer 0 decides: thresholds everywhere (JumpReLU) or nowhere (ReLU)
    act = "jumprelu" if encs[0][3] is not None else "relu"
    if act == "jumprelu" and any(e[3] is None for e in encs):
        missing = next(l for l, e in enumerate(encs) if e[3] is None)
        raise CLTError(f"W_enc_{missing}.safetensors in {url} has no threshold_{missing} but layer 0 has one")
    clt = _assemble([(*e, W_dec) for e, W_dec in zip(encs, decs)], act, hook, cfg.get("model_name", ""), dtype)
    if maps:
        register(clt, maps, [f"W_dec_{l}" for l in range(L)])
    return clt


def _assemble(layers: list[tuple], act: str, hook: str, model_name: str, dtype) -> CrossLayerTranscoder:
    """A CLT holding the loaded tensors; per layer (W_enc [d_tc, d], b_enc, b_dec, threshold or None, W_dec
    [d_tc, span, d]). Built on the meta device and then given the tensors: the weights exist once, never also as
    a zero-filled copy (which doubled the peak memory of a load)."""
    d, L = layers[0][0].shape[1], len(layers)
    with torch.device("meta"):
        clt = CrossLayerTranscoder(L, d, [x[0].shape[0] for x in layers], None, act, hook, model_name, dtype)
    clt.spans = [x[4].shape[1] for x in layers]

    def param(t: torch.Tensor, dt=dtype) -> torch.nn.Parameter:
        return torch.nn.Parameter(t.to(dt).contiguous(), requires_grad=False)  # no copy when already so

    for l, (W_enc, b_enc, b_dec, thr, W_dec) in enumerate(layers):
        clt.W_enc[l], clt.b_enc[l], clt.b_dec[l], clt.W_dec[l] = param(W_enc), param(b_enc), param(b_dec), param(W_dec)
        # thresholds stay fp32 (docs/design.md); a ReLU CLT has zeros
        clt.threshold[l] = param(thr if thr is not None else torch.zeros(W_enc.shape[0]), torch.float32)
    return clt


def _load_transcoder_set(fs, path, url, cfg, hook, dtype) -> CrossLayerTranscoder:
    entries = cfg.get("transcoders")
    if entries is None:  # circuit-tracer's default file names
        files = [f"layer_{l}.safetensors" for l in range(_count_layers(fs, path, "layer"))]
    elif isinstance(entries, list) and all(isinstance(e, str) for e in entries):
        files = entries  # list position = layer
    else:
        raise CLTError(f"{url}/config.yaml: 'transcoders' must be a list of file paths, one per layer")
    if not files:
        raise CLTError(f"{url} has no per-layer transcoder files (layer_0.safetensors, ...)")
    # checked before any file is read: a 33 KB config naming one 1 MB file 1,500 times cost 2 GB before
    seen: dict[str, int] = {}
    for i, fp in enumerate(files):
        if "\x00" in fp:
            raise CLTError(f"{url}/config.yaml: transcoder file {i} holds a NUL byte")
        norm = "/".join(p for p in fp.replace("\\", "/").split("/") if p not in ("", "."))
        if norm in seen:
            raise CLTError(f"{url}/config.yaml: transcoder file {fp[:200]!r} is listed twice (layers {seen[norm]} and {i})")
        seen[norm] = i
    if len(files) > MAX_LAYERS:
        raise CLTError(f"{url}/config.yaml lists {len(files)} transcoder files: more than {MAX_LAYERS} layers")
    tensors = []
    for fp in files:
        parts = fp.replace("\\", "/").split("/")
        if not fp.strip() or "://" in fp or fp.startswith(("/", "\\", "~")) or ".." in parts or ":" in parts[0]:
            raise CLTError(f"{url}/config.yaml: transcoder file {fp[:200]!r} must be a relative path inside the CLT folder")
        fname = fp.rsplit("/", 1)[-1]
        d0 = tensors[0][2].shape[0] if tensors else None  # the model width, once the first file is read
        t = _read(fs, f"{path}/{fp}", url, path, {"b_dec": [(d0,)], "W_enc": [(None, d0), (d0, None)],
                                                   "W_dec": [(None, d0), (d0, None)]})
        if "W_skip" in t:
            raise CLTError(f"{fname}: transcoders with a skip connection (W_skip) are not supported")
        W_enc, W_dec = _get(t, "W_enc", fname), _get(t, "W_dec", fname)
        b_enc, b_dec = _get(t, "b_enc", fname), _get(t, "b_dec", fname)
        d_tc, d = b_enc.shape[0], b_dec.shape[0]
        # circuit-tracer stores W_enc and W_dec as [d_tc, d]; accept the transposed (GemmaScope) orientation too
        W_enc = W_enc.T if W_enc.shape == (d, d_tc) and d != d_tc else W_enc
        W_dec = W_dec.T if W_dec.shape == (d, d_tc) and d != d_tc else W_dec
        if W_enc.shape != (d_tc, d) or W_dec.shape != (d_tc, d):
            raise CLTError(f"{fname}: inconsistent shapes W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                           f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
        thr = t.get("activation_function.threshold", t.get("threshold"))
        tensors.append((W_enc, b_enc, b_dec, thr, W_dec))
    act = "jumprelu" if all(x[3] is not None for x in tensors) else "relu"
    return _assemble([(W_enc, b_enc, b_dec, thr, W_dec[:, None]) for W_enc, b_enc, b_dec, thr, W_dec in tensors],
                     act, hook, cfg.get("model_name", ""), dtype)


def save_transcoder_set(clt: CrossLayerTranscoder, url: str, **storage_options) -> None:
    """Write a per-layer transcoder (span 1) in circuit-tracer's `transcoder_set` layout."""
    if clt.is_cross_layer:
        raise CLTError("only a per-layer transcoder (span 1) can be written as a transcoder_set")
    cfg = {"model_name": clt.model_name, "model_kind": "transcoder_set",
           "feature_input_hook": HOOK_NAMES[clt.feature_input_hook], "feature_output_hook": "hook_mlp_out",
           "transcoders": [f"layer_{l}.safetensors" for l in range(clt.n_layers)]}
    with atomic_dir(url, **storage_options) as (fs, tmp):
        with fs.open(f"{tmp}/config.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        for l in range(clt.n_layers):
            t = {"W_enc": clt.W_enc[l], "W_dec": clt.W_dec[l][:, 0], "b_enc": clt.b_enc[l], "b_dec": clt.b_dec[l]}
            if clt.activation == "jumprelu":
                t["activation_function.threshold"] = clt.threshold[l].float()
            with fs.open(f"{tmp}/layer_{l}.safetensors", "wb") as f:
                f.write(st_save({k: v.detach().contiguous() for k, v in t.items()}))
