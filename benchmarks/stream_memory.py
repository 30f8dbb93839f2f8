"""Peak memory of a streamed ``certlib verify`` stays flat in the number of images.

    python benchmarks/stream_memory.py                 # 50,000 16x16 PNGs, runs at 5,000 and 50,000
    python benchmarks/stream_memory.py --n 2000 --small 200   # quick look

Writes a synthetic ``imagefolder:`` (10 classes, random 16x16 RGB PNGs, fixed
seed) and a tiny model (Flatten, Gemm 768->32, Relu, Gemm 32->10) to a
temporary folder, then runs ``certlib verify`` (through ``cli.main``, in a
fresh process each time) with ``--limit SMALL`` and on all N images, side by
side.  For each run it prints wall seconds, images/s, and the peak RSS of the
verify process (``ru_maxrss``, which includes the bounds, the model and
onnxruntime) and of its largest decoding worker (``RUSAGE_CHILDREN``), and
what the split would take in memory as float32 (what ``load()`` materialises).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = r"""
import json, resource, sys, time
from certlib import cli
sys.argv = ["certlib"] + sys.argv[1:]
t = time.perf_counter()
code = 0
try:
    cli.main()
except SystemExit as e:
    code = e.code or 0
dt = time.perf_counter() - t
print(json.dumps({"code": code, "seconds": dt,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_folder(root: Path, n: int, size: int = 16, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / "val" / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / "val" / f"c{i % classes:02d}" / f"{i:06d}.png")


def make_model(path: Path, size: int = 16, classes: int = 10, hidden: int = 32, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d = 3 * size * size
    inits = {"W1": rng.normal(size=(hidden, d)) / np.sqrt(d), "b1": np.zeros(hidden),
             "W2": rng.normal(size=(classes, hidden)) / np.sqrt(hidden), "b2": np.zeros(classes)}
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.save(m, str(path))


def run(model: Path, root: Path, limit: int | None, workers: int, batch: int, tsv: Path) -> dict:
    args = ["verify", str(model), "--data", f"imagefolder:{root}", "--eps", "0.01", "--workers", str(workers),
            "--batch-size", str(batch), "--device", "cpu", "--tsv", str(tsv)]
    if limit:
        args += ["--limit", str(limit)]
    # stderr (the progress bar and report) passes through to the terminal
    r = subprocess.run([sys.executable, "-c", RUN, *args], stdout=subprocess.PIPE, text=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["code"] != 0:
        raise SystemExit(f"certlib verify failed with exit code {out['code']}")
    out["rows"] = tsv.read_text().count("\n") - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="images in the synthetic split")
    ap.add_argument("--small", type=int, default=5_000, help="the --limit of the first run")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dir", default=None, help="reuse / keep the folder here (default: a temporary one)")
    args = ap.parse_args()
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    root = Path(args.dir or tmp.name)
    if not (root / "val").is_dir() or sum(1 for _ in (root / "val").rglob("*.png")) != args.n:
        t = time.perf_counter()
        make_folder(root, args.n, args.size)
        print(f"wrote {args.n} {args.size}x{args.size} PNGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    make_model(root / "tiny.onnx", args.size)
    print(f"cpu cores: {os.cpu_count()}  workers {args.workers}  batch {args.batch_size}")
    res = {}
    for lim in (args.small, None):
        n = lim or args.n
        out = run(root / "tiny.onnx", root, lim, args.workers, args.batch_size, root / f"out-{n}.tsv")
        assert out["rows"] == n, out
        mem_gib = n * 3 * args.size * args.size * 4 / 2 ** 30
        print(f"{n:>7} images: {out['seconds']:7.1f} s  {n / out['seconds']:8.1f} images/s  peak RSS "
              f"{out['peak_rss_mib']:7.1f} MiB (largest worker {out['worker_peak_rss_mib']:.1f} MiB); "
              f"in memory the split would be {mem_gib * 1024:.1f} MiB of float32")
        res[n] = out
    a, b = res[args.small], res[args.n]
    print(f"peak RSS ratio {args.n} / {args.small} images: {b['peak_rss_mib'] / a['peak_rss_mib']:.3f}")
    print(json.dumps({"n_small": args.small, "n": args.n, "size": args.size, "runs": res,
                      "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"]}))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
