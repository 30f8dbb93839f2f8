"""certlib verify throughput against onnxruntime float32 inference, side by side.

    python benchmarks/verify_speed.py --preset cifar10 --n 256 [--depth D] [--method exact]
    python benchmarks/verify_speed.py --preset imagenet --n 4 --method power

Same model (the preset with random weights, exported to ONNX), same images
(uniform random in [0,1]; with ``--train-steps N`` the preset is first trained
N steps on digits upscaled to its input size and certified on the upscaled
digits test images), one after the other in one process:

* onnxruntime: CPUExecutionProvider, float32, batches of ``--batch``;
* certlib: ``certify_arrays`` (import and bounds timed separately; forward with the
  float32 fast path and its float64 fallback, certification), at eps = the
  median certified radius of a float64 calibration run (not timed), so the
  certification decisions are non-trivial;
* certlib float64 path only (``fast=False``), for comparison.

Printed: images/s of each and the ratios certlib / onnxruntime for the
forward + certify part (the per-image cost: bounds are computed once per
model) and end to end (import + bounds + forward + certify).  The machine is
shared: CPU time is printed next to wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _train_on_digits(m, steps: int):
    """Train ``m`` (in place) on digits upscaled to its input; return the
    upscaled digits test split (float32 images, labels)."""
    import torch.nn.functional as F

    from certlib.data import load as load_data

    c = m.config

    def upscaled(split):
        d = load_data("digits", split)
        t = F.interpolate(torch.as_tensor(d.x), size=(c.input_size, c.input_size), mode="bilinear",
                          align_corners=False).repeat(1, c.in_channels, 1, 1)
        return t, torch.as_tensor(d.y, dtype=torch.int64)

    xtr, ytr = upscaled("train")
    opt = torch.optim.Adam(m.parameters(), 1e-4)    # no warm-up here: 1e-3 diverges on the cifar10 preset
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    m.train()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (32,), generator=gen)
        loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    m.eval()
    xte, yte = upscaled("test")
    with torch.no_grad():
        acc = float((m(xte).argmax(1) == yte).float().mean())
    print(f"trained {steps} steps in {time.perf_counter() - t:.0f} s: last loss {loss.item():.3f}, "
          f"digits test accuracy {acc:.3f}", flush=True)
    return xte.numpy().astype(np.float32), yte.numpy()


def main() -> None:
    from certlib.certify import certify
    from certlib.data import Dataset
    from certlib.models.liresnet import build
    from certlib.onnx.export import export_onnx
    from certlib.onnx.importer import load
    from certlib.verify import certify_arrays, predict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--method", default="exact")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-float64", action="store_true", help="do not time the float64-only path")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="first train the preset this many Adam steps (lr 1e-4, cross-entropy, batch 32, gradient "
                         "norm clipped to 1) on the embedded "
                         "digits upscaled to its input size, and certify digits test images instead of uniform "
                         "noise: a stand-in for a trained model (random weights give logit gaps far below the "
                         "float32 error bound, so every sample falls back to float64)")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    over = {k: v for k, v in (("depth", args.depth), ("width", args.width)) if v is not None}
    m = build(args.preset, **over).eval()
    c = m.config
    rng = np.random.default_rng(0)
    if args.train_steps:
        x, y = _train_on_digits(m, args.train_steps)
        x, y = x[:args.n], y[:args.n]
        ds = Dataset(x, y, "digits/test upscaled", c.num_classes)
        args.n = len(x)
    else:
        x = rng.random((args.n, c.in_channels, c.input_size, c.input_size), dtype=np.float32)
        ds = Dataset(x, rng.integers(0, c.num_classes, args.n), "uniform", c.num_classes)
    print(f"{args.preset} L{c.depth} W{c.width}, n={args.n}, method={args.method}, torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}, load avg {os.getloadavg()}", flush=True)
    res = {"preset": args.preset, "depth": c.depth, "width": c.width, "n": args.n, "method": args.method}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        export_onnx(m, path)
        so = ort.SessionOptions()
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        sess.run(None, {name: x[:1]})  # warm-up
        _, t_ort, c_ort = _timed(lambda: [sess.run(None, {name: x[i:i + args.batch]})
                                          for i in range(0, len(x), args.batch)])
        (_, g), t_imp, _ = _timed(lambda: load(path))
    # the bounds, once per model (timed), then calibration (untimed): eps = the
    # median radius of the float64 path at eps 0 on the first 32 images
    from certlib.ir.compose import analyze
    a, t_bounds, _ = _timed(lambda: analyze(g, args.method))
    cal = min(len(x), 32)
    f64, e64 = predict(g, x[:cal], a.node_bounds, args.batch)
    rad = certify(f64, e64, ds.y[:cal], a.K, a.body, 0.0).radius
    eps = float(np.median(rad[rad > 0])) if np.any(rad > 0) else 0.0
    rep, t_fast, c_fast = _timed(lambda: certify_arrays(g, a, ds.x, ds.y, eps, batch_size=args.batch,
                                                        device=args.device, fast=True))
    fwd_fast = rep.seconds["forward"] + rep.seconds["certify"]
    res.update(eps=eps, ort_s=t_ort, ort_cpu_s=c_ort, import_s=t_imp, bounds_s=t_bounds,
               fast_forward_certify_s=fwd_fast, fast_cpu_s=c_fast, fast=rep.fast, seconds=rep.seconds,
               certified=int(rep.result.certified.sum()))
    ips_ort = args.n / t_ort
    ips_fast = args.n / fwd_fast
    ips_e2e = args.n / (t_imp + t_bounds + fwd_fast)
    print(f"onnxruntime float32      {t_ort:9.2f} s  {ips_ort:9.2f} img/s  (cpu {c_ort:.1f} s)")
    print(f"certlib import           {t_imp:9.2f} s")
    print(f"certlib bounds ({args.method})    {t_bounds:9.2f} s")
    print(f"certlib forward+certify  {fwd_fast:9.2f} s  {ips_fast:9.2f} img/s  ratio {ips_fast / ips_ort:.3f}  "
          f"(cpu {c_fast:.1f} s; {rep.fast})")
    print(f"  of which: float32 forward {rep.seconds['forward']:.2f} s, float64 recomputation + certify "
          f"{rep.seconds['certify'] - rep.seconds.get('veto', 0.0):.2f} s, onnxruntime veto "
          f"{rep.seconds.get('veto', 0.0):.2f} s ({int((rep.result.certified | (rep.result.radius > 0)).sum())} "
          f"samples claim a radius)")
    print(f"certlib end to end       {t_imp + t_bounds + fwd_fast:9.2f} s  {ips_e2e:9.2f} img/s  "
          f"ratio {ips_e2e / ips_ort:.3f}")
    res.update(ratio_forward=ips_fast / ips_ort, ratio_end_to_end=ips_e2e / ips_ort)
    if not args.skip_float64:
        rep64 = certify_arrays(g, a, ds.x, ds.y, eps, batch_size=args.batch, fast=False)
        f64s = rep64.seconds["forward"] + rep64.seconds["certify"]
        same = bool(np.array_equal(rep64.result.certified, rep.result.certified)
                    and np.array_equal(rep64.result.pred, rep.result.pred))
        print(f"float64 path only        {f64s:9.2f} s  {args.n / f64s:9.2f} img/s  ratio "
              f"{args.n / f64s / ips_ort:.3f}  (same decisions as the fast path: {same})")
        res.update(float64_forward_certify_s=f64s, ratio_float64=args.n / f64s / ips_ort, same_decisions=same)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
