"""GPU checks and measurements of certification (``python benchmarks/gpu_check.py --certify``,
or this file directly).  Synthetic weights and images: no data, no network.

    python benchmarks/gpu_certify.py                       # on a CUDA machine
    python benchmarks/gpu_certify.py --device cpu --quick  # tiny sizes, to test the script

1. agreement: the exact method's conv engine in torch float64 on DEVICE vs the
   numpy engine on the CPU (verifiers/svd_torch.py, proofs/device_bounds.md),
   on small convolutions (strides, groups, dilation, constants 2^+-60) and
   against the explicit matrix's SVD: bound >= truth, |rel diff| <= 1e-12;
2. ``certlib bounds`` (analyze, exact) of the cifar10 preset on DEVICE and
   on the CPU (numpy) side by side, and of the imagenet preset on DEVICE
   (the CPU time of the latter is in the README: minutes);
3. streamed verify of the cifar10 and imagenet presets on DEVICE
   (verify_stream on random images): images/s, projection for the
   50,000-image validation set, and agreement with the CPU path (same
   predictions and certified set) on the first images.
Prints readable lines, then one JSON line; exit 1 if an agreement check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def agreement(dev: str) -> dict:
    from certlib.verifiers.operators import Conv2d
    from certlib.verifiers.svd import conv_bound, on_device

    rng = np.random.default_rng(0)
    worst, ok = 0.0, True
    for (co, ci, k, n, s, p, d, g) in [(4, 3, 3, 6, 1, 1, 1, 1), (6, 4, 3, 7, 2, 1, 1, 2), (5, 2, 2, 5, 1, 0, 2, 1),
                                       (3, 3, 5, 3, 1, 2, 1, 1), (48, 48, 3, 4, 1, 1, 1, 1)]:
        for scale in (1.0, 2.0 ** -60, 2.0 ** 60):
            op = Conv2d(rng.normal(size=(co, ci // g, k, k)) * scale, stride=(s, s), padding=(p,) * 4,
                        dilation=(d, d), groups=g, input_shape=(ci, n, n))
            ref = conv_bound(op).value
            with on_device(dev, torch_on_cpu=True):
                b = conv_bound(op).value
            truth = float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])
            rel = abs(b - ref) / ref
            worst = max(worst, rel)
            ok &= b >= truth and rel <= 1e-12
    print(f"agreement: torch float64 engine on {dev} vs numpy engine: max rel diff {worst:.3g}, bounds >= "
          f"explicit-matrix norms: {'ok' if ok else 'FAIL'}")
    return {"max_rel_diff": worst, "ok": bool(ok)}


def _graph(preset: str, quick: bool):
    from certlib.models.liresnet import build
    from certlib.onnx.export import build_onnx
    from certlib.onnx.importer import import_model

    torch.manual_seed(0)
    over = (dict(width=32, depth=2) if preset == "cifar10" else dict(width=48, depth=2, dense_dim=64)) if quick else {}
    model = build(preset, **over).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.scale.mul_(8.0)
    return import_model(build_onnx(model)), model.config


def _sync(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def bounds(g, dev: str, cpu_too: bool) -> dict:
    from certlib.ir.compose import analyze
    from certlib.verifiers.svd import on_device

    out = {}
    for where in ([dev, "cpu"] if cpu_too else [dev]):
        t = time.perf_counter()
        with on_device(where, torch_on_cpu=False):
            a = analyze(g, "exact")
        _sync(where)
        out[where] = {"seconds": time.perf_counter() - t, "body": float(a.body.value)}
    return out


def stream(g, dev: str, n: int, check: int, batch: int) -> dict:
    from certlib.data import Dataset
    from certlib.data.stream import ArrayStream
    from certlib.verify_stream import verify_stream

    rng = np.random.default_rng(0)
    x = rng.random((n, *g.input_shape), dtype=np.float32)
    ds = Dataset(x, rng.integers(0, g.num_classes, n), "random", g.num_classes)
    verify_stream(g, ArrayStream(ds.take(min(n, batch))), 0.1, batch_size=batch, device=dev)  # warm-up
    t = time.perf_counter()
    rep, _ = verify_stream(g, ArrayStream(ds), 0.1, batch_size=batch, device=dev)
    _sync(dev)
    dt = time.perf_counter() - t
    out = {"images": n, "seconds": dt, "seconds_bounds": rep.seconds.get("bounds"),
           "images_per_s_after_bounds": n / max(dt - rep.seconds.get("bounds", 0.0), 1e-9)}
    if check:
        cpu, _ = verify_stream(g, ArrayStream(ds.take(check)), 0.1, batch_size=batch, device="cpu")
        r, c = rep.result, cpu.result
        out["agrees_with_cpu"] = bool(np.array_equal(r.pred[:check], c.pred) and
                                      np.array_equal(r.certified[:check], c.certified))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny presets and few images (to test the script)")
    ap.add_argument("--images", type=int, default=512, help="images per preset for the verify timing")
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args(argv)
    from certlib.verify import resolve_device

    dev = resolve_device(a.device)
    res = {"device": dev, "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
           "torch": torch.__version__, "quick": a.quick}
    print(f"device: {res['device_name']}{'  QUICK (tiny sizes)' if a.quick else ''}")
    res["agreement"] = agreement(dev)
    ok = res["agreement"]["ok"]
    n = 16 if a.quick else a.images
    for preset in ("cifar10", "imagenet"):
        g, cfg = _graph(preset, a.quick)
        b = bounds(g, dev, cpu_too=(preset == "cifar10" and dev != "cpu"))
        s = stream(g, dev, n if preset == "cifar10" else max(4, n // 8), 8 if dev != "cpu" else 0,
                   a.batch_size if preset == "cifar10" else 32)
        proj = 50_000 / s["images_per_s_after_bounds"] / 3600
        res[preset] = {"model": f"L{cfg.depth} W{cfg.width}", "bounds": b, "verify": s,
                       "projected_hours_50k": proj}
        ok &= s.get("agrees_with_cpu", True)
        bt = ", ".join(f"{k} {v['seconds']:.1f} s (body {v['body']:.6g})" for k, v in b.items())
        print(f"{preset} L{cfg.depth} W{cfg.width}: bounds {bt}; verify {s['images']} images "
              f"{s['images_per_s_after_bounds']:.1f} images/s after the bounds; 50,000 images ~ {proj:.2f} h"
              + (f"; same decisions as the CPU on {8} images: {s['agrees_with_cpu']}" if "agrees_with_cpu" in s
                 else ""))
    print(json.dumps(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
