"""The CLT registry: immutable CLT versions in object storage and a `production` pointer with a history.

Layout under a registry URL (any fsspec URL: a local directory or s3://bucket/prefix):

    registry.json                     marks the location as a registry (format version)
    versions/<version_id>/            the CLT files (circuit-tracer layout, loadable with load_clt) + meta.json
    by_content/<sha256>.json          which version holds a given CLT (same bytes: same version)
    production.json                   the pointer: {version, previous, seq, action, reason, updated_at}
    history/<seq>.json                every pointer change, oldest first (for audits and rollback)
    evals/<version_id>/<eval>.json    evaluation results of a version on a fixed evaluation set (a cache)
    runs/<date>.json                  nightly retraining state (ct_ray/ops/retrain.py)

A version's `meta.json` is written last and is its commit record: a directory without it is an interrupted
registration, invisible to readers and overwritten by the next one. Version ids are `<date>-<hash8>` of the CLT's
bytes, and registering the same CLT again (any day) yields the same version. Every JSON file is written whole (temporary file +
rename locally, one PUT on S3), so a reader sees the old pointer or the new one. Writers are expected to be one
at a time (the nightly job has a deterministic submission id, so two never run for the same date).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil

from ..errors import CTRayError, StorageError, one_line
from ..store.fs import COMMIT_MARKER, atomic_dir, filesystem, is_local
from ..store.names import is_name
from ..store.tables import Store

FORMAT = "ct_ray-clt-registry"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _valid_pointer(p) -> bool:
    """A production.json / history record as the registry writes it: version ids are safe names (store/names.py), seq >= 1."""
    if not isinstance(p, dict):
        return False
    ok_id = lambda v: is_name(v)
    return (ok_id(p.get("version")) and (p.get("previous") is None or ok_id(p.get("previous")))
            and isinstance(p.get("seq"), int) and not isinstance(p.get("seq"), bool) and p["seq"] >= 1)


def clt_files(url: str, **storage_options) -> tuple[object, str, list[str]]:
    """(fs, root, relative file names) of a committed CLT directory, markers and hidden files left out."""
    fs, root = filesystem(url, **storage_options)
    try:
        if not fs.exists(f"{root}/config.yaml"):
            raise CTRayError(f"no CLT at {url} (no config.yaml)")
        names = sorted(p[len(root) + 1:] for p in fs.find(root))
        for n in names:
            try:
                n.encode()
            except UnicodeEncodeError:
                raise CTRayError(f"{url} holds a file whose name is not UTF-8: not registered") from None
        if is_local(fs):  # the registry copies bytes: none from outside the CLT folder
            top = os.path.realpath(root)
            for n in names:
                if os.path.commonpath([os.path.realpath(f"{root}/{n}"), top]) != top:
                    raise CTRayError(f"{n} in {url} is a symlink out of the CLT folder: not registered")
    except CTRayError:
        raise
    except Exception as e:
        raise StorageError(f"cannot read {url}: {one_line(e)}") from e
    return fs, root, [n for n in names if n != COMMIT_MARKER and not n.rsplit("/", 1)[-1].startswith(".")]


def content_hash(url: str, **storage_options) -> str:
    """sha256 over the CLT's file names and bytes: the identity of a CLT, wherever it is stored."""
    fs, root, names = clt_files(url, **storage_options)
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        with fs.open(f"{root}/{n}", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class Registry:
    def __init__(self, url: str, **storage_options):
        self.store = Store(url, **storage_options)
        self.url = self.store.url
        self.storage_options = dict(storage_options)

    def __repr__(self):
        return f"Registry({self.url!r})"

    # --- reading -----------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.store.read_json("registry.json") is not None

    def require(self) -> Registry:
        if not self.exists():
            raise CTRayError(f"no CLT registry at {self.url} (nothing registered there yet)")
        return self

    def version_url(self, version: str) -> str:
        return f"{self.url}/versions/{version}"

    def meta(self, version: str) -> dict:
        """The committed version's meta.json; a one-line error for unknown versions."""
        self.require()
        m = self.store.read_json(f"versions/{version}/meta.json") if is_name(version) else None
        if m is None:
            known = [v["version"] for v in self.versions()][-10:]
            raise CTRayError(f"no version {version!r} in {self.url}" +
                             (f" (latest: {', '.join(known)})" if known else " (no versions yet)"))
        return m

    def _ls(self, rel: str) -> list[str]:
        """Names directly under `rel` (sorted; hidden temporaries left out)."""
        fs, d = self.store.fs, f"{self.store.root}/{rel}"
        try:
            if not self.store.local:
                fs.invalidate_cache(d)
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(d, detail=False)] if fs.exists(d) else []
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"cannot list {self.url}/{rel}: {one_line(e)}") from e
        return sorted(n for n in names if not n.startswith("."))

    def versions(self) -> list[dict]:
        """Committed versions' meta, oldest first."""
        metas = [(n, self.store.read_json(f"versions/{n}/meta.json")) for n in self._ls("versions") if is_name(n)]
        return sorted((m for n, m in metas if isinstance(m, dict) and m.get("version") == n),
                      key=lambda m: (str(m.get("created_at", "")), m["version"]))

    def production(self) -> dict | None:
        """The pointer, validated: a tampered one (a `../` version, a missing seq) is an error, never followed."""
        p = self.store.read_json("production.json")
        if p is not None and not _valid_pointer(p):
            v = str(p.get("version"))[:80] if isinstance(p, dict) else "?"
            raise CTRayError(f"{self.url}/production.json is invalid (version {v!r}): restore it from history/")
        return p

    def production_url(self) -> str | None:
        p = self.production()
        return self.version_url(p["version"]) if p else None

    def history(self) -> list[dict]:
        entries = [self.store.read_json(f"history/{n}") for n in self._ls("history") if n.endswith(".json")]
        cur = self.production()
        # an entry written by a writer that died before moving the pointer is not part of the history; an invalid
        # (tampered) entry is left out too
        return [e for e in entries if _valid_pointer(e) and cur and e["seq"] <= cur["seq"]]

    # --- writing -----------------------------------------------------------------------------------------
    def register(self, clt_url: str, *, metrics: dict | None = None, provenance: dict | None = None,
                 date: str | None = None, **clt_storage_options) -> str:
        """Copy the CLT at `clt_url` into a new immutable version; returns its id (`<date>-<hash8>`). Registering
        the same CLT again returns the existing version untouched."""
        digest = content_hash(clt_url, **clt_storage_options)
        # the content index names the version of these bytes once and for all, so a later register (another day,
        # or a retry after a crash half-way) finds the same version id
        known = self.store.read_json(f"by_content/{digest}.json")
        vid = known["version"] if known else f"{(date or _dt.date.today().isoformat()).replace('-', '')}-{digest[:8]}"
        if self.store.read_json(f"versions/{vid}/meta.json") is not None:
            return vid
        if not self.exists():
            self.store.write_json("registry.json", {"format": FORMAT, "version": 1, "created_at": _now()})
        if not known:
            self.store.write_json(f"by_content/{digest}.json", {"version": vid})
        src_fs, src_root, names = clt_files(clt_url, **clt_storage_options)
        try:
            with atomic_dir(self.version_url(vid), **self.storage_options) as (fs, tmp):
                for n in names:
                    if "/" in n:
                        fs.makedirs(f"{tmp}/{n.rsplit('/', 1)[0]}", exist_ok=True)
                    with src_fs.open(f"{src_root}/{n}", "rb") as fi, fs.open(f"{tmp}/{n}", "wb") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 22)
        except CTRayError:
            raise
        except Exception as e:
            raise StorageError(f"cannot write {self.version_url(vid)}: {one_line(e)}") from e
        from ..clt.io import load_clt

        clt = load_clt(self.version_url(vid), **self.storage_options)  # also proves the copy loads
        meta = {"version": vid, "created_at": _now(), "source": clt_url, "content_sha256": digest,
                "clt": {"model_name": clt.model_name, "n_layers": clt.n_layers, "d_model": clt.d_model,
                        "features_per_layer": clt.d_tc[0], "spans": clt.spans, "activation": clt.activation},
                "metrics": metrics or {}, "provenance": provenance or {}}
        self.store.write_json(f"versions/{vid}/meta.json", meta)  # the commit record, last
        return vid

    def _move_pointer(self, version: str, action: str, reason: str = "") -> dict:
        cur = self.production()
        rec = {"version": version, "previous": cur["version"] if cur else None, "seq": (cur["seq"] + 1) if cur else 1,
               "action": action, "reason": reason, "updated_at": _now()}
        # history first: a crash in between leaves the pointer (the truth) unchanged and the entry is rewritten
        self.store.write_json(f"history/{rec['seq']:08d}.json", rec)
        self.store.write_json("production.json", rec)
        return rec

    def promote(self, version: str, reason: str = "manual") -> dict:
        self.meta(version)
        cur = self.production()
        if cur and cur["version"] == version:
            return cur
        return self._move_pointer(version, "promote", reason)

    def rollback(self, to: str | None = None, reason: str = "rollback") -> dict:
        """Point production back at the version it replaced (or at `to`)."""
        self.require()
        cur = self.production()
        if cur is None:
            raise CTRayError(f"nothing to roll back: {self.url} has no production version")
        target = to or cur.get("previous")
        if not target:
            raise CTRayError(f"nothing to roll back to: {cur['version']} is the first production version")
        self.meta(target)
        return self._move_pointer(target, "rollback", reason)

    def runs(self) -> list[dict]:
        """Nightly retraining states (runs/<date>.json), oldest first."""
        return [r for r in (self.store.read_json(f"runs/{n}") for n in self._ls("runs") if n.endswith(".json")) if r]

    # --- evaluation cache ----------------------------------------------------------------------------------
    def read_eval(self, version: str, eval_id: str) -> dict | None:
        return self.store.read_json(f"evals/{version}/{eval_id}.json")

    def write_eval(self, version: str, eval_id: str, result: dict) -> None:
        self.store.write_json(f"evals/{version}/{eval_id}.json", result)

    def evals(self, version: str) -> dict[str, dict]:
        return {n[:-5]: self.store.read_json(f"evals/{version}/{n}") for n in self._ls(f"evals/{version}")
                if n.endswith(".json")}
