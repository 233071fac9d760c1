"""CLT loading benchmark: peak memory of `load_clt` against the CLT's own size (the baseline), and its speed against
reading the same bytes from disk.

    python benchmarks/clt_load.py [--layers 30] [--d-model 576] [--features 1024] [--s3]

Writes a random cross-layer CLT (SmolLM2-135M's shape by default: 30 layers, d_model 576) with `save_clt` to a
temporary folder, then loads it in a fresh subprocess per mode and prints the peak RSS above the process's RSS before
the load, as a ratio to the CLT's bytes: read whole (`lazy_decoders=False`; 1.0 is the floor, the weights
themselves) and with lazy decoders (the default: the decoders are mapped, not read; the floor is the encoders' share).
With --s3 the CLT is also served by a local S3 server (moto) and loaded from `s3://` both ways (lazily, the decoder
files are copied to unnamed files in $TMPDIR and mapped); the speed baseline is then reading the files through s3fs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _hwm() -> int:
    """Peak RSS (VmHWM) in bytes. ru_maxrss is no use here: a child keeps its parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(path: str, lazy: bool) -> None:
    from ct_ray import load_clt
    from ct_ray.store.fs import filesystem

    fs, root = filesystem(path)
    fs.ls(root)  # connect first: the client's own memory is not the load's
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _hwm()
    t = time.perf_counter()
    clt = load_clt(path, lazy_decoders=lazy)
    dt = time.perf_counter() - t
    size = sum(p.numel() * p.element_size() for p in clt.parameters())
    peak = _hwm()
    t = time.perf_counter()
    raw = 0
    for f in fs.glob(f"{root}/*.safetensors"):  # one file at a time, as the load reads them
        with fs.open(f, "rb") as fh:
            raw += len(fh.read())
    dt_raw = time.perf_counter() - t
    print(json.dumps({"clt_bytes": size, "peak_above_start": peak - before, "load_s": dt, "read_s": dt_raw,
                      "file_bytes": raw}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--s3", action="store_true", help="also load the CLT from a local S3 server (moto)")
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    ap.add_argument("--_lazy", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._load:
        return _load(a._load, bool(a._lazy))
    import torch

    from ct_ray.clt.io import save_clt
    from ct_ray.clt.transcoder import CrossLayerTranscoder

    with tempfile.TemporaryDirectory() as tmp:
        clt = CrossLayerTranscoder(a.layers, a.d_model, a.features)
        with torch.no_grad():
            for p in clt.parameters():
                p.normal_()
        save_clt(clt, f"{tmp}/clt")
        dec = sum(w.numel() * w.element_size() for w in clt.W_dec)
        del clt
        res = {("local", lazy): _run(f"{tmp}/clt", lazy, os.environ) for lazy in (0, 1)}
        if a.s3:
            with _s3_server() as env:
                url = "s3://bench/clt"
                subprocess.run([sys.executable, "-c", f"from ct_ray import load_clt, save_clt; "
                                f"save_clt(load_clt({f'{tmp}/clt'!r}), {url!r})"], env=env, check=True)
                res.update({("s3", lazy): _run(url, lazy, env) for lazy in (0, 1)})
    mb = 2**20
    size = res["local", 0]["clt_bytes"]
    print(f"CLT {a.layers} layers x {a.features} features, d_model {a.d_model}: {size / mb:.0f} MB "
          f"(decoders {dec / mb:.0f} MB)")
    for (where, lazy), r in res.items():
        name, floor = ("lazy decoders", 1 - dec / size) if lazy else ("read whole", 1.0)
        print(f"{where}, {name}: peak above start {r['peak_above_start'] / mb:.0f} MB = "
              f"{r['peak_above_start'] / size:.2f}x the CLT (floor {floor:.2f}x); load {r['load_s']:.2f} s vs reading "
              f"the files {r['read_s']:.2f} s (ratio {r['load_s'] / max(r['read_s'], 1e-9):.1f}x; headers and "
              f"finiteness are checked)")


def _run(path: str, lazy: int, env) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_load", path, "--_lazy", str(lazy)], capture_output=True,
                         text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def _s3_server():
    """moto's S3 server on loopback with a bucket `bench`; yields the environment that points clients at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                 aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
    try:
        yield env
    finally:
        server.stop()


if __name__ == "__main__":
    main()
