"""One prepared GPU check of the trainer (synthetic tensors: no data, no network).

    python benchmarks/gpu_check.py                    # on a CUDA machine (H100: ~25 s + start-up)
    python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes, to test the script
    python benchmarks/gpu_check.py --skip-imagenet --precision fp32   # the paper presets' precision
    python benchmarks/gpu_check.py --skip-imagenet --precision bf16   # what bf16 saves (issue 16)
    python benchmarks/gpu_check.py --certify          # certification: GPU bound engine, bounds, verify

Measures, with the trainer's own step (certlib.train.step.TrainStep:
``--precision`` for the network, default auto = bf16 autocast on CUDA; the
paper presets train in fp32), channels_last, fused AdamW, EMMA + 10 power
iterations in strict float32 with the residual blocks batched, on a side CUDA
stream that overlaps the forward, gradient clipping):

1. cifar10 preset (L12 W512) at batch 256: images/s of the certified step and
   of a plain cross-entropy step of the same network, and their ratio;
2. imagenet preset (L18 W588, 224 px) at batch 256: step time, images/s and
   peak memory (torch.cuda.max_memory_allocated);
3. projected GPU-hours of the paper's schedules on ONE such GPU: CIFAR 800
   epochs x 50,000 images, ImageNet 400 epochs x 1,281,167 images (data
   loading assumed free: a lower bound on the wall time);
4. sanity: the EMMA loss decreases over 20 steps on a fixed synthetic batch
   (lr 1e-4, eps 18/255);
5. the power iteration alone: grouped blocks (used) vs one stage at a time
   vs grouped with TF32 (for information: the trainer keeps it float32).

Prints readable lines, then one JSON line.  Exit code 1 if the sanity check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

CIFAR_IMAGES, CIFAR_EPOCHS = 50_000, 800
IMAGENET_IMAGES, IMAGENET_EPOCHS = 1_281_167, 400


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


PRECISION = "auto"  # --precision


def _setup(preset: str, overrides: dict, loss: str, dev, compile_: bool, power_iters: int = 10, **step_kw):
    from certlib.models.liresnet import LiResNet
    from certlib.train.config import build_config, preset_config
    from certlib.train.distributed import DistInfo
    from certlib.train.step import TrainStep, resolve_precision

    cfg = preset_config(preset, **overrides)
    prec = resolve_precision(PRECISION, dev)
    torch.manual_seed(0)
    model = LiResNet(build_config(cfg)).to(dev)
    cl = dev.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay,
                            **({"fused": True} if dev.type == "cuda" else {}))
    net = torch.compile(model) if compile_ else model
    step = TrainStep(model, net, opt, loss=loss, trades_lambda=1.0, power_iters=power_iters,
                     grad_clip=cfg.grad_clip, test_eps=cfg.eps, device=dev, precision=prec, info=DistInfo(),
                     channels_last=cl, **step_kw)
    return cfg, model, step, prec


def _batch(model, batch: int, dev, seed: int = 0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x.to(dev), y.to(dev)


def time_fn(fn, warmup: int, steps: int, dev, after_warmup=None) -> float:
    """Median seconds per call (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if after_warmup is not None:
        after_warmup()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_steps(step, x, y, eps: float, warmup: int, steps: int, dev, after_warmup=None) -> float:
    return time_fn(lambda: step(x, y, len(y), eps, 1e-4), warmup, steps, dev, after_warmup)


def time_power(model, dev, warmup: int, steps: int) -> dict:
    """Seconds of 10 power iterations + the estimate's backward, four ways."""
    from certlib.train.power import PowerIteration, lipschitz_estimate
    from certlib.train.step import strict_fp32

    def run(fn, tf32: bool):
        def go():
            model.zero_grad(set_to_none=True)
            with strict_fp32(dev):
                if tf32 and dev.type == "cuda":
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
                fn().backward()
        return time_fn(go, warmup, steps, dev)

    graph = PowerIteration(model, 10, cuda_graph=True)
    return {"graph_fp32_s": run(graph, False),
            "grouped_fp32_s": run(lambda: lipschitz_estimate(model, 10), False),
            "grouped_conv_fp32_s": run(lambda: lipschitz_estimate(model, 10, "conv"), False),
            "per_stage_fp32_s": run(lambda: model.lipschitz_estimate(10), False),
            "grouped_tf32_s": run(lambda: lipschitz_estimate(model, 10), True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny models and batches (to test the script on a CPU)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the network (adds minutes)")
    ap.add_argument("--skip-imagenet", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                    help="the network's precision (auto: bf16 on CUDA; the paper presets' default is fp32)")
    ap.add_argument("--certify", action="store_true", help="run the certification checks instead "
                    "(benchmarks/gpu_certify.py: GPU bound engine vs numpy, bounds and streamed verify timings)")
    a, rest = ap.parse_known_args(argv)
    if a.certify:
        import os

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_certify import main as certify_main

        return certify_main(["--device", a.device, *(["--quick"] if a.quick else []), *rest])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    global PRECISION
    PRECISION = a.precision

    from certlib.train.distributed import pick_device

    dev = pick_device(a.device)
    if dev.type == "cpu" and not a.quick:
        print("warning: full sizes on a CPU take very long; use --quick", file=sys.stderr)
    if a.quick:
        cifar_o, imnet_o = dict(width=32, depth=2), dict(width=48, depth=2, dense_dim=64)
        batch, ibatch, steps, warmup = 8, 2, 2, 1
        if dev.type == "cpu":
            torch.set_num_threads(1)
    else:
        cifar_o, imnet_o = {}, {}
        batch, ibatch, steps, warmup = a.batch, a.batch, a.steps, a.warmup
    t_start = time.perf_counter()
    res = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "quick": a.quick, "compile": a.compile}
    print(f"device: {res['device_name']} (torch {torch.__version__}){'  QUICK (tiny sizes)' if a.quick else ''}")

    # 1. CIFAR-10 preset: certified vs plain step
    cfg, model, cert, prec = _setup("cifar10", cifar_o, "emma", dev, a.compile)
    x, y = _batch(model, batch, dev)
    t_cert = time_steps(cert, x, y, cfg.eps, warmup, steps, dev)
    pw = time_power(model, dev, warmup, steps)
    del cert, model
    _, model, plain, _ = _setup("cifar10", cifar_o, "ce", dev, a.compile)
    t_plain = time_steps(plain, x, y, cfg.eps, warmup, steps, dev)
    c = model.config
    del plain, model
    ips = batch / t_cert
    res["cifar10"] = {"model": f"L{c.depth} W{c.width}", "batch": batch, "precision": prec,
                      "certified_step_s": t_cert, "certified_images_per_s": ips,
                      "plain_step_s": t_plain, "plain_images_per_s": batch / t_plain,
                      "ratio_certified_over_plain": t_cert / t_plain, "power_iteration": pw}
    print(f"cifar10 L{c.depth} W{c.width} batch {batch} ({prec}): certified step {t_cert * 1e3:.1f} ms = "
          f"{ips:.0f} images/s; plain CE step {t_plain * 1e3:.1f} ms = {batch / t_plain:.0f} images/s; "
          f"ratio {t_cert / t_plain:.3f} (target <= 1.3)")
    print(f"power iteration, 10 iterations + backward, float32: {pw['grouped_fp32_s'] * 1e3:.1f} ms blocks "
          f"batched (as the trainer runs it), {pw['graph_fp32_s'] * 1e3:.1f} ms with a CUDA graph, "
          f"{pw['grouped_conv_fp32_s'] * 1e3:.1f} ms as one grouped conv, "
          f"{pw['per_stage_fp32_s'] * 1e3:.1f} ms one stage at a time; {pw['grouped_tf32_s'] * 1e3:.1f} ms "
          "with TF32 (not used)")
    if dev.type == "cuda":  # the same step without the side stream / with a CUDA graph
        for name, kw in (("no_overlap", dict(overlap=False)), ("with_cuda_graph", dict(cuda_graph=True))):
            _, model, other, _ = _setup("cifar10", cifar_o, "emma", dev, a.compile, **kw)
            t_o = time_steps(other, x, y, cfg.eps, warmup, steps, dev)
            del other, model
            res["cifar10"][f"certified_step_{name}_s"] = t_o
            print(f"certified step {name.replace('_', ' ')}: {t_o * 1e3:.1f} ms (ratio {t_o / t_plain:.3f})")
    cifar_h = CIFAR_EPOCHS * CIFAR_IMAGES / ips / 3600
    res["projected_gpu_hours"] = {"cifar10_800_epochs": cifar_h}
    print(f"projected: CIFAR-10 {CIFAR_EPOCHS} epochs x {CIFAR_IMAGES} images = {cifar_h:.1f} GPU-hours "
          "on this GPU (step time only)")

    # 2. ImageNet preset: step time and peak memory
    if not a.skip_imagenet:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            cfg_i, model, istep, _ = _setup("imagenet", imnet_o, "emma", dev, a.compile)
            xi, yi = _batch(model, ibatch, dev)
            first = {}

            def reset():  # cuDNN's autotuning (first steps) allocates large trial workspaces
                if dev.type == "cuda":
                    first["peak"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
                    torch.cuda.reset_peak_memory_stats(dev)

            t_i = time_steps(istep, xi, yi, cfg_i.eps, max(1, warmup // 2), max(2, steps // 2), dev, reset)
            peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
            ci = model.config
            del istep, model, xi, yi
            ips_i = ibatch / t_i
            hours_i = IMAGENET_EPOCHS * IMAGENET_IMAGES / ips_i / 3600
            res["imagenet"] = {"model": f"L{ci.depth} W{ci.width} D{ci.dense_dim}", "batch": ibatch,
                               "step_s": t_i, "images_per_s": ips_i, "peak_memory_gib": peak,
                               "peak_memory_first_steps_gib": first.get("peak")}
            res["projected_gpu_hours"]["imagenet_400_epochs"] = hours_i
            mem = (f"{peak:.2f} GiB peak in steady steps ({first['peak']:.2f} GiB in the first steps, with "
                   "cuDNN autotuning)") if peak is not None else "peak memory n/a on CPU"
            print(f"imagenet L{ci.depth} W{ci.width} batch {ibatch}: step {t_i * 1e3:.1f} ms = {ips_i:.0f} "
                  f"images/s, {mem}")
            print(f"projected: ImageNet {IMAGENET_EPOCHS} epochs x {IMAGENET_IMAGES} images = {hours_i:.1f} "
                  "GPU-hours on this GPU (step time only; the paper's batch is 1024 over several GPUs)")
        except torch.cuda.OutOfMemoryError as e:
            res["imagenet"] = {"batch": ibatch, "error": f"out of memory: {str(e)[:200]}"}
            print(f"imagenet batch {ibatch}: OUT OF MEMORY")
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # 3. sanity: EMMA loss decreases over 20 steps on one fixed synthetic batch.  lr 1e-4: the
    # recipe's peak 1e-3 without its 20 warm-up epochs blows up a fresh L12 W512 (on CPU in fp32 too)
    cfg, model, cert, _ = _setup("cifar10", cifar_o, "emma", dev, False)
    xs, ys = _batch(model, min(batch, 64), dev, seed=1)
    eps = cfg.eps * 0.5
    losses = []
    for _ in range(20):
        st = cert(xs, ys, len(ys), eps, 1e-4)
        losses.append(float(st[0]) / len(ys))
    ok = all(v == v for v in losses) and statistics.mean(losses[-5:]) < statistics.mean(losses[:5])
    res["sanity"] = {"emma_losses": losses, "decreased": ok}
    print(f"sanity: EMMA loss over 20 steps {losses[0]:.4f} -> {losses[-1]:.4f}: "
          f"{'DECREASES (ok)' if ok else 'DOES NOT DECREASE (FAIL)'}")
    # 4. the side stream and the CUDA graph change nothing: 5 steps each way, same weights
    if dev.type == "cuda":
        small = dict(width=64, depth=4, dense_dim=64)
        runs = []
        for kw in (dict(cuda_graph=True), dict(overlap=False, cuda_graph=False)):
            _, model, st, _ = _setup("cifar10", small, "emma", dev, False, **kw)
            for i in range(5):
                xb, yb = _batch(model, 64, dev, seed=10 + i)
                st(xb, yb, len(yb), cfg.eps, 1e-4)
            torch.cuda.synchronize(dev)
            runs.append({k: v.detach().float().clone() for k, v in model.state_dict().items()})
            del st, model
        diff = max(float((runs[0][k] - runs[1][k]).abs().max()) for k in runs[0])
        res["stream_graph_max_weight_diff"] = diff
        ok = ok and diff < 1e-4
        print(f"side stream + CUDA graph vs plain eager, 5 steps: max weight difference {diff:.3g} "
              f"({'ok' if diff < 1e-4 else 'FAIL'})")
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {res['seconds']} s")
    print(json.dumps(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
