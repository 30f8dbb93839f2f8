"""Checking a certificate vs producing it, side by side.

    python benchmarks/check.py [--cifar-depth 2] [--n 100] [--method exact]

Producing = import + per-operator bounds + float64 forward with error bounds +
certification + writing the certificate (what ``certlib verify --proof`` does).
Checking = ``proofs/checker.py`` on the same model, certificate and data (walk,
hashes, re-proving every bound, K, forward + onnxruntime, every sample).
Wall time is the headline; CPU time (all threads of the process) is printed too,
because wall time on a shared machine depends on the other jobs running.
Models: the digits preset (random weights, 360 digits test images) and the
cifar10 preset (random weights, ``--n`` synthetic images; ``--cifar-depth``
overrides the preset's 12 blocks, e.g. 2 to fit a small CPU budget).
eps is the median certified radius (found by a certification at eps=0 that is
not timed), so about half of the samples are claimed certified.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def produce(path: str, ds, method: str):
    """certlib's own pipeline (as verify_file + --proof), timed; eps = median radius."""
    from certlib.certificate import build_certificate
    from certlib.certify import certify
    from certlib.ir.compose import analyze
    from certlib.onnx.importer import load
    from certlib.verify import VerifyReport, file_sha256, predict

    t0, c0 = time.perf_counter(), time.process_time()
    _, g = load(path)
    a = analyze(g, method, fold_inputs=False)  # as --proof does
    logits, err = predict(g, ds.x, a.node_bounds)
    t1, c1 = time.perf_counter(), time.process_time()
    radius = certify(logits, err, ds.y, a.K, a.body, 0.0).radius  # calibration only (not timed)
    eps = float(np.median(radius[radius > 0])) if np.any(radius > 0) else 0.0
    t2, c2 = time.perf_counter(), time.process_time()
    res = certify(logits, err, ds.y, a.K, a.body, eps)
    rep = VerifyReport(path, file_sha256(path), eps, ds.name, ds.sha256(), a, res)
    cert = build_certificate(path, rep, ds, ds.name)
    blob = json.dumps(cert, allow_nan=False)
    t3, c3 = time.perf_counter(), time.process_time()
    return cert, blob, (t1 - t0) + (t3 - t2), (c1 - c0) + (c3 - c2), eps


def bench(name: str, model, ds, method: str, save: str | None = None) -> dict:
    from certlib.onnx.export import export_onnx
    from certlib.proofs.checker import check

    with tempfile.TemporaryDirectory() as d:
        d = save or d
        path = os.path.join(d, "model.onnx")
        export_onnx(model.eval(), path)
        cert, blob, t_prod, c_prod, eps = produce(path, ds, method)
        if save:
            with open(os.path.join(d, "cert.json"), "w") as f:
                f.write(blob)
            np.savez(os.path.join(d, "data.npz"), x=ds.x, y=ds.y)
        t, c = time.perf_counter(), time.process_time()
        with open(path, "rb") as f:
            res = check(f.read(), json.loads(blob), ds.x, ds.y)
        t_check, c_check = time.perf_counter() - t, time.process_time() - c
    print(f"{name:<28} n={len(ds):<4} eps={eps:.4g} certified={res['certified']:<4} "
          f"produce {t_prod:8.2f} s   check {t_check:8.2f} s   check/produce {t_check / t_prod:.2f}   "
          f"(CPU: {c_prod:.1f} s vs {c_check:.1f} s, {c_check / c_prod:.2f})", flush=True)
    return {"model": name, "produce_s": t_prod, "check_s": t_check, "ratio": t_check / t_prod,
            "produce_cpu_s": c_prod, "check_cpu_s": c_check, "cpu_ratio": c_check / c_prod}


def main() -> None:
    from certlib.data import Dataset, load
    from certlib.models.liresnet import build

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar-depth", type=int, default=None, help="blocks of the cifar10 preset (default 12)")
    ap.add_argument("--cifar-width", type=int, default=None, help="width of the cifar10 preset (default 512)")
    ap.add_argument("--n", type=int, default=100, help="synthetic cifar images")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--save", default=None, help="keep the cifar model, certificate and data in this folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    rows = []
    if not args.skip_digits:
        rows.append(bench("digits (preset, random)", build("digits"), load("digits"), args.method))
    over = {k: v for k, v in (("depth", args.cifar_depth), ("width", args.cifar_width)) if v is not None}
    m = build("cifar10", **over)
    c = m.config
    rng = np.random.default_rng(0)
    ds = Dataset(rng.random((args.n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, args.n), "synthetic", 10)
    rows.append(bench(f"cifar10 L{c.depth} W{c.width} (random)", m, ds, args.method, args.save))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
