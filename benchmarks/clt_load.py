"""CLT loading benchmark: peak memory of `load_clt` against the CLT's own size (the baseline), and its speed against
reading the same bytes from disk.

    python benchmarks/clt_load.py [--layers 30] [--d-model 576] [--features 1024]

Writes a random cross-layer CLT (SmolLM2-135M's shape by default: 30 layers, d_model 576) with `save_clt` to a
temporary folder, then loads it in a fresh subprocess per mode and prints the peak RSS above the process's RSS before
the load, as a ratio to the CLT's bytes: read whole (`lazy_decoders=False`; 1.0 is the floor, the weights
themselves) and with lazy decoders (the default: the decoders are mapped, not read; the floor is the encoders' share).
"""

from __future__ import annotations

import argparse
import json
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

    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _hwm()
    t = time.perf_counter()
    clt = load_clt(path, lazy_decoders=lazy)
    dt = time.perf_counter() - t
    size = sum(p.numel() * p.element_size() for p in clt.parameters())
    peak = _hwm()
    t = time.perf_counter()
    raw = sum(len(f.read_bytes()) for f in Path(path).glob("*.safetensors"))
    dt_raw = time.perf_counter() - t
    print(json.dumps({"clt_bytes": size, "peak_above_start": peak - before, "load_s": dt, "read_s": dt_raw,
                      "file_bytes": raw}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
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
        res = {}
        for lazy in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--_load", f"{tmp}/clt", "--_lazy", str(lazy)],
                                 capture_output=True, text=True, check=True).stdout
            res[lazy] = json.loads(out.strip().splitlines()[-1])
    mb = 2**20
    size = res[0]["clt_bytes"]
    print(f"CLT {a.layers} layers x {a.features} features, d_model {a.d_model}: {size / mb:.0f} MB "
          f"(decoders {dec / mb:.0f} MB)")
    for lazy, name, floor in ((0, "read whole", 1.0), (1, "lazy decoders", 1 - dec / size)):
        r = res[lazy]
        print(f"{name}: peak above start {r['peak_above_start'] / mb:.0f} MB = {r['peak_above_start'] / size:.2f}x "
              f"the CLT (floor {floor:.2f}x); load {r['load_s']:.2f} s vs reading the files {r['read_s']:.2f} s "
              f"(ratio {r['load_s'] / max(r['read_s'], 1e-9):.1f}x; headers and finiteness are checked)")


if __name__ == "__main__":
    main()
