"""Lazily loaded decoders: rows read from the CLT's files, not from memory.

`load_clt` memory-maps a CLT's decoder files (private, copy-on-write maps: `clt.W_dec` behaves as any tensor, and
its pages are read from the file only when touched; a remote CLT's files are first copied to unnamed local
files). Attribution needs only the active features' rows, a small part of the decoders on short prompts;
`decoder_rows` reads those rows from the file (through the kernel's page cache, into the caller's own buffer), so
the decoders never become part of this process's resident memory at all, as with circuit-tracer's `lazy_decoder`.

The file is read through a descriptor opened at load time (the same file as the map, even if the path is replaced
later). A layer whose map was written in place in this process (`W_dec[l][...] = x`, also through `.data`), or
whose tensor was replaced, is read from the tensor instead: `/proc/self/pagemap` tells whether any page of the map
was copied on write. Where that cannot be read (not Linux), rows always come from the tensor.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MappedFile:
    """An open decoder file and where each mapped tensor's bytes start in it."""

    fd: int
    offsets: dict[str, int]

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass
class _Source:
    file: MappedFile
    offset: int  # of the layer's decoder in the file
    ptr: int  # where the map holds it (a different pointer: the tensor was replaced)
    nbytes: int


_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CLT -> [_Source or None per layer]


def register(clt, files: list[MappedFile | None], names: list[str]) -> None:
    """Remember the files of `clt`'s memory-mapped decoders (`names[l]`: layer l's tensor name in files[l])."""
    sources = []
    for l, (f, name) in enumerate(zip(files, names)):
        w = clt.W_dec[l]
        ok = f is not None and name in f.offsets
        sources.append(_Source(f, f.offsets[name], w.data_ptr(), w.numel() * w.element_size()) if ok else None)
    if any(s is not None for s in sources):
        _SOURCES[clt] = sources  # beside the CLT, not on it: a CLT stays picklable (Ray sends CLTs to workers)


def is_lazy(clt) -> bool:
    return clt in _SOURCES


def decoder_rows(clt, l: int, idx: torch.Tensor) -> torch.Tensor:
    """`clt.W_dec[l][idx]` ([*idx.shape, span, d]), read from the file when layer l's decoder is a clean map."""
    w = clt.W_dec[l].detach()
    src = _SOURCES.get(clt, [None] * (l + 1))[l]
    if src is None or w.device.type != "cpu" or w.data_ptr() != src.ptr or _written(src.ptr, src.nbytes):
        return w[idx]
    uniq, inv = torch.unique(idx.flatten(), return_inverse=True)
    out = torch.empty(len(uniq), *w.shape[1:], dtype=w.dtype)
    row = w[0].numel() * w.element_size()
    buf = out.view(-1).view(torch.uint8).numpy()
    ids = uniq.tolist()
    i = 0
    while i < len(ids):  # one read per run of consecutive rows
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        want = memoryview(buf[i * row : j * row])
        got = os.preadv(src.file.fd, [want], src.offset + ids[i] * row)
        if got != len(want):
            raise OSError(f"decoder file of layer {l} is shorter than when it was loaded")
        i = j
    return out[inv.view(idx.shape)]


_PAGE = mmap.PAGESIZE


def _written(ptr: int, nbytes: int) -> bool:
    """Whether a page of this private file map was written in this process (it is then anonymous: present and not
    file-backed, or swapped). True when /proc/self/pagemap cannot be read."""
    first, last = ptr // _PAGE, (ptr + nbytes - 1) // _PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(first * 8)
            data = f.read((last - first + 1) * 8)
    except OSError:
        return True
    if len(data) != (last - first + 1) * 8:
        return True
    e = np.frombuffer(data, dtype=np.uint64)
    present, swapped, file_page = (e >> np.uint64(63)) & 1, (e >> np.uint64(62)) & 1, (e >> np.uint64(61)) & 1
    return bool(((present == 1) & (file_page == 0)).any() or swapped.any())
