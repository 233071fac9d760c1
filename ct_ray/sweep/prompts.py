"""Prompt sources (inline list, or Parquet / JSONL / text on any fsspec URL) and deterministic task keys."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

from ..errors import CTRayError, StorageError, one_line
from ..specs import PromptEntry, PromptFile, SweepSpec
from ..store.fs import filesystem

KEY_VERSION = 1


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the input (first occurrence)
    prompt: str
    target: str | None = None
    invalid: str | None = None  # why the input could not be read as a prompt (e.g. not UTF-8)
    raw: bytes | None = None  # the raw bytes of an invalid prompt (they name its key)
    key: str = ""


def task_key(spec: SweepSpec, prompt: str, target: str | None, raw: bytes | None = None) -> str:
    """Deterministic key of one prompt's task: a hash of the prompt and everything that changes its rows."""
    material = {
        "v": KEY_VERSION,
        "prompt": prompt if raw is None else raw.hex(),
        "raw": raw is not None,
        "target": target,
        "model": spec.model,
        "clt": spec.clt_id(),
        **spec.params(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _decode(b: bytes) -> tuple[str, str | None]:
    try:
        return b.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return b.decode("utf-8", errors="replace"), f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})"


def _read_file(src: PromptFile, storage_options: dict) -> list[tuple[str, str | None, str | None, bytes | None]]:
    fmt = src.format
    lower = src.url.lower()
    if fmt is None:
        for ext, f in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                       (".txt", "text"), (".text", "text")):
            if lower.endswith(ext):
                fmt = f
                break
        else:
            raise CTRayError(f"cannot tell the format of {src.url}: set prompts.format (parquet, jsonl or text)")
    opts = dict(storage_options) if src.url.startswith("s3://") else {}
    fs, path = filesystem(src.url, **opts)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CTRayError(f"prompt file not found: {src.url}") from e
    except Exception as e:
        raise StorageError(f"cannot read prompt file {src.url}: {one_line(e)}") from e

    rows: list[tuple[str, str | None, str | None, bytes | None]] = []  # (prompt, target, invalid, raw)
    if fmt == "text":
        if src.target_column:
            raise CTRayError("prompts.target_column needs a Parquet or JSONL file (text files hold prompts only)")
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for b in lines:
            b = b[:-1] if b.endswith(b"\r") else b
            text, bad = _decode(b)
            rows.append((text, None, bad, b if bad else None))
    elif fmt == "jsonl":
        for n, b in enumerate(data.split(b"\n"), 1):
            if not b.strip():
                continue
            text, bad = _decode(b)
            if bad:
                rows.append((text, None, bad, b))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append((text, None, f"line {n} is not JSON: {e.msg}", b))
                continue
            if isinstance(obj, str):
                obj = {src.column: obj}
            if not isinstance(obj, dict) or src.column not in obj:
                raise CTRayError(f"{src.url} line {n}: no {src.column!r} field (set prompts.column)")
            p = obj[src.column]
            t = obj.get(src.target_column) if src.target_column else None
            if not isinstance(p, str):
                rows.append((json.dumps(p), None, f"prompt is not a string: {type(p).__name__}", None))
                continue
            rows.append((p, None if t is None else str(t), None, None))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:
            raise CTRayError(f"{src.url} is not a Parquet file: {one_line(e)}") from e
        for c in [src.column] + ([src.target_column] if src.target_column else []):
            if c not in table.column_names:
                raise CTRayError(f"{src.url} has no column {c!r} (columns: {', '.join(table.column_names)})")
        col = table.column(src.column)
        tcol = table.column(src.target_column).to_pylist() if src.target_column else [None] * table.num_rows
        binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
        for v, t in zip(col.to_pylist(), tcol):
            if v is None:
                rows.append(("", None, "prompt is null", None))
            elif binary:
                text, bad = _decode(v)
                rows.append((text, t, bad, v if bad else None))
            else:
                rows.append((str(v), None if t is None else str(t), None, None))
    if src.limit:
        rows = rows[: src.limit]
    return rows


def _encodable(prompt: str, target: str | None) -> tuple[str, str | None, str | None, bytes | None]:
    """A prompt or target that UTF-8 cannot encode (a lone surrogate, from a YAML or JSON escape) becomes an invalid
    item, shown with the surrogate escaped and keyed by its raw code units: one error row, the sweep goes on."""
    for what, text in (("prompt", prompt), ("target", target)):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            show = lambda t: None if t is None else t.encode("utf-8", "backslashreplace").decode()  # noqa: E731
            raw = prompt.encode("utf-8", "surrogatepass") + b"\x00" + (target or "").encode("utf-8", "surrogatepass")
            return (show(prompt), show(target),
                    f"{what} is not encodable as UTF-8 (lone surrogate {text[e.start]!a} at character {e.start})", raw)
    return prompt, target, None, None


def read_prompts(spec: SweepSpec) -> tuple[list[PromptItem], int]:
    """The sweep's prompts as keyed items, duplicates (same key) dropped; returns (items, n_duplicates)."""
    if isinstance(spec.prompts, PromptFile):
        rows = _read_file(spec.prompts, spec.storage.storage_options())
    else:
        rows = []
        for p in spec.prompts:
            if isinstance(p, PromptEntry):
                rows.append((p.prompt, p.target, None, None))
            else:
                rows.append((p, None, None, None))
    if not rows:
        raise CTRayError("the prompt source holds no prompts")
    seen, items, dups = set(), [], 0
    for i, (prompt, target, invalid, raw) in enumerate(rows):
        if invalid is None:
            prompt, target, invalid, raw = _encodable(prompt, target)
        key = task_key(spec, prompt, target, raw)
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        items.append(PromptItem(i, prompt, target, invalid, raw, key))
    return items, dups
