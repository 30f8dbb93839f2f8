"""Time to a SOUND whole-network Lipschitz bound, per method, against the time of
500 float32 power iterations per layer (what the published LiResNet code runs at
evaluation), on the same network, measured side by side in one run.

    python benchmarks/bounds.py                    # cifar10 preset (L12 W512)
    python benchmarks/bounds.py --preset digits    # quick
    python benchmarks/bounds.py --depth 2          # fewer blocks (quick look)

Weights: random init with trained-like scales (residual branches scaled up so
the fused blocks have norms ~1.0-1.1, as after training), fixed seed.
Prints per method: seconds, seconds / baseline, body bound / exact bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from certlib.ir.compose import analyze
from certlib.models.liresnet import build
from certlib.onnx.export import build_onnx
from certlib.onnx.importer import import_model


def baseline_power(model, iters: int = 500) -> tuple[float, float]:
    """500 float32 power iterations per stage on the true operators (the
    published code's evaluation-time estimate), timed."""
    t = time.perf_counter()
    with torch.no_grad():
        est = 1.0
        for st in model.linear_stages():
            v = torch.randn((1, *st.input_shape))
            v /= v.norm()
            for _ in range(iters):
                w = st.adjoint(st.forward(v))
                v = w / w.norm()
            est *= float(st.forward(v).norm())
    return time.perf_counter() - t, est


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--methods", default="exact,power,sdp")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the baseline (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    over = {"depth": args.depth} if args.depth else {}
    model = build(args.preset, **over).eval()
    with torch.no_grad():
        for b in model.blocks:  # trained-like scales
            b.scale.mul_(8.0)
    g = import_model(build_onnx(model))
    print(f"machine: {platform.machine()} {platform.processor() or ''} torch threads {torch.get_num_threads()}")
    print(f"network: {args.preset} depth {model.config.depth} width {model.config.width}")
    base_t, base_est = baseline_power(model)
    print(f"baseline: 500 float32 power iterations per layer: {base_t:.2f} s, estimate {base_est:.6g} (NOT sound)")
    results = {}
    for m in args.methods.split(","):
        t = time.perf_counter()
        try:
            a = analyze(g, m)
        except Exception as e:  # a method may refuse large operators
            print(f"{m:>6}: refused: {type(e).__name__}: {str(e)[:150]}")
            results[m] = {"refused": str(e)[:300]}
            continue
        dt = time.perf_counter() - t
        results[m] = {"seconds": dt, "body": a.body.value}
    exact = results.get("exact", {}).get("body")
    for m, r in results.items():
        if "seconds" not in r:
            continue
        ratio = r["body"] / exact if exact else float("nan")
        print(f"{m:>6}: {r['seconds']:8.2f} s  = {r['seconds'] / base_t:6.3f}x baseline   "
              f"body bound {r['body']:.9g}  bound/exact {ratio:.6f}  "
              f"bound/baseline-estimate {r['body'] / base_est:.6f}")
        r["time_ratio"] = r["seconds"] / base_t
        r["bound_over_exact"] = ratio
    print(json.dumps({"preset": args.preset, "depth": model.config.depth, "baseline_seconds": base_t,
                      "baseline_estimate": base_est, "methods": results}))


if __name__ == "__main__":
    main()
