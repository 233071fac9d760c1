"""fsspec helpers: every location is a URL (local path, file://, s3://...). Writes are atomic."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

import fsspec

from ..errors import StorageError

COMMIT_MARKER = "_COMMITTED"


# An endpoint that accepts and never answers must fail in well under a minute, not hang: per request a connect
# and a read (socket inactivity) timeout, one botocore attempt, and S3_RETRIES tries by s3fs with its backoff.
# CT_RAY_S3_CONNECT_TIMEOUT / CT_RAY_S3_READ_TIMEOUT / CT_RAY_S3_RETRIES override; storage options win.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 6.0
S3_RETRIES = 2
# The read timeout does not cover a PUT waiting for its `100 Continue` (an endpoint that accepts and never answers
# kept `ct-ray sweep`'s store write check waiting for good): every S3 request as a whole is bounded too.
# CT_RAY_S3_REQUEST_TIMEOUT overrides (seconds; large, since one request can upload a 50 MB part).
S3_REQUEST_TIMEOUT = 300.0


def s3_config_kwargs(storage_options: dict) -> dict:
    """botocore config of an S3 filesystem: the given `config_kwargs` over the timeout defaults."""
    env = os.environ.get
    return {"connect_timeout": float(env("CT_RAY_S3_CONNECT_TIMEOUT") or S3_CONNECT_TIMEOUT),
            "read_timeout": float(env("CT_RAY_S3_READ_TIMEOUT") or S3_READ_TIMEOUT),
            "retries": {"max_attempts": 1, "mode": "standard"}, **(storage_options.get("config_kwargs") or {})}


def filesystem(url: str, **storage_options):
    """(filesystem, path) for a URL. S3 endpoints come from `endpoint_url` or AWS_ENDPOINT_URL; credentials only
    from the standard AWS chain (never from spec files); timeouts and retries bounded (see S3_READ_TIMEOUT)."""
    url = str(url)
    if url.startswith("s3://") and "endpoint_url" not in storage_options and os.environ.get("AWS_ENDPOINT_URL"):
        storage_options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if url.startswith("s3://") and "endpoint_url" in storage_options:
        storage_options = {"client_kwargs": {"endpoint_url": storage_options.pop("endpoint_url")}, **storage_options}
    if url.startswith("s3://"):
        storage_options["config_kwargs"] = s3_config_kwargs(storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage {url!r}: {e}") from e
    if url.startswith("s3://"):
        fs.retries = int(os.environ.get("CT_RAY_S3_RETRIES") or S3_RETRIES)  # s3fs's own retry loop (default 5)
        _bound_requests(fs, float(os.environ.get("CT_RAY_S3_REQUEST_TIMEOUT") or S3_REQUEST_TIMEOUT))
    return fs, path.rstrip("/")


class S3RequestTimeout(TimeoutError):
    pass


def _bound_requests(fs, seconds: float) -> None:
    """Every request of this (cached, shared) s3fs instance fails after `seconds` instead of waiting forever."""
    if getattr(fs, "_ct_ray_bound", None) == seconds:
        return
    import asyncio

    call = getattr(fs, "_ct_ray_call_s3", None) or fs._call_s3

    async def bounded(method, *args, **kwargs):
        try:
            return await asyncio.wait_for(call(method, *args, **kwargs), seconds)
        except asyncio.TimeoutError:
            raise S3RequestTimeout(f"S3 {method} got no answer in {seconds:g} s") from None

    fs._ct_ray_call_s3, fs._call_s3, fs._ct_ray_bound = call, bounded, seconds


def absolute_url(url: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in other directories); other URLs unchanged."""
    if url is None or "://" in str(url) and not str(url).startswith("file://"):
        return url
    return os.path.abspath(str(url).removeprefix("file://"))


def worker_locations(model: str, clt: str | None) -> tuple[str, str | None]:
    """A model and a CLT as a Ray worker must be told them: local folders and files made absolute (the worker's
    working directory is not the driver's, `~` is expanded), built-in names, hub ids and URLs unchanged. The one
    place sweeps, feature jobs and split rows prepare their actors' model and CLT."""
    model = str(model)
    if os.path.isdir(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))
    if clt and "://" not in clt and os.path.exists(os.path.expanduser(clt)):
        clt = os.path.abspath(os.path.expanduser(clt))
    return model, clt


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def check_replaceable(url: str, **storage_options):
    """(fs, path) of a local output folder that atomic_dir may replace: absent, empty, or an earlier output (it has
    the commit marker). Never a file, a link, or a folder of other things (`--out ~/work`): a one-line error."""
    fs, path = filesystem(url, **storage_options)
    if is_local(fs) and os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and (
            not os.listdir(path) or os.path.exists(os.path.join(path, COMMIT_MARKER)))):
        raise StorageError(f"{path} exists and is not a folder ct_ray wrote: choose a new path or remove it")
    return fs, path


@contextlib.contextmanager
def atomic_dir(url: str, **storage_options):
    """Yield (fs, tmp_path) to write a directory's files into; on success the directory appears at `url` at once.

    Locally: write into a hidden sibling, then rename (replacing an older copy). On object storage (no rename):
    write the files, then a commit marker last; readers treat a directory without the marker as absent."""
    fs, path = check_replaceable(url, **storage_options)
    if is_local(fs):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            yield fs, tmp
            with open(os.path.join(tmp, COMMIT_MARKER), "w") as f:
                f.write("ok\n")
            if os.path.exists(path):
                old = f"{tmp}.old"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        try:
            if fs.exists(f"{path}/{COMMIT_MARKER}"):
                fs.rm(f"{path}/{COMMIT_MARKER}")
            yield fs, path
            with fs.open(f"{path}/{COMMIT_MARKER}", "w") as f:
                f.write("ok\n")
        except (StorageError, ValueError, KeyboardInterrupt):
            raise
        except (OSError, RuntimeError) as e:  # the object store failing: one line naming what was written
            from ..errors import one_line

            raise StorageError(f"cannot write {url}: {one_line(e)}") from e
