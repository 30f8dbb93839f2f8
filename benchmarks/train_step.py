"""Cost of certified training: one EMMA step (with the power iteration's
``--power-iters`` iterations per step, in float32) against a plain
cross-entropy step of the same network, batch and precision.

    python benchmarks/train_step.py --preset cifar10 --batch 16 --threads 1

Prints both throughputs (images/s), the time ratio certified / plain, the
per-step cost of the power iteration alone, and the ratio that this extra
cost would give at ``--project-batch`` (the power iteration's cost does not
grow with the batch; labelled as a projection).  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps of each kind, interleaved; the fastest of each is reported (other "
                         "processes on a shared machine only ever slow a step down)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--power-iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--project-batch", type=int, default=256)
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    from certlib.models.liresnet import LiResNet
    from certlib.train.config import build_config, preset_config
    from certlib.train.distributed import DistInfo, pick_device
    from certlib.train.step import TrainStep, margin_constants, resolve_precision

    dev = pick_device(a.device)
    prec = resolve_precision(a.precision, dev)
    cfg = preset_config(a.preset, width=a.width or None, depth=a.depth or None)
    torch.manual_seed(0)
    base = LiResNet(build_config(cfg))
    c = base.config
    cl = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, c.in_channels, c.input_size, c.input_size, generator=g).to(dev)
    y = torch.randint(0, c.num_classes, (a.batch,), generator=g).to(dev)

    def stepper(loss: str):
        m = copy.deepcopy(base).to(dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=cfg.weight_decay)
        return m, TrainStep(m, m, opt, loss=loss, trades_lambda=1.0, power_iters=a.power_iters,
                            grad_clip=cfg.grad_clip, test_eps=cfg.eps, device=dev, precision=prec,
                            info=DistInfo(), channels_last=cl)

    m_cert, cert = stepper("emma")
    _, plain = stepper("ce")

    def timed(fn) -> float:
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t

    run_c = lambda: cert(x, y, a.batch, cfg.eps, 1e-4)  # noqa: E731
    run_p = lambda: plain(x, y, a.batch, cfg.eps, 1e-4)  # noqa: E731

    def run_power():
        m_cert.zero_grad(set_to_none=True)
        margin_constants(m_cert, a.power_iters, dev).sum().backward()

    for _ in range(a.warmup):
        run_p(), run_c(), run_power()
    tp, tc, tw = [], [], []
    for _ in range(a.steps):  # interleaved: a busy machine slows both kinds alike
        tp.append(timed(run_p))
        tc.append(timed(run_c))
        tw.append(timed(run_power))
    t_plain, t_cert, t_pow = min(tp), min(tc), min(tw)
    extra = max(t_cert - t_plain, 0.0)
    per_img = t_plain / a.batch
    proj = (per_img * a.project_batch + extra) / (per_img * a.project_batch)
    res = {"preset": a.preset, "model": f"L{c.depth} W{c.width}", "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "precision": prec, "batch": a.batch,
           "power_iters": a.power_iters, "plain_step_s": t_plain, "certified_step_s": t_cert,
           "plain_images_per_s": a.batch / t_plain, "certified_images_per_s": a.batch / t_cert,
           "time_ratio": t_cert / t_plain, "power_iteration_s": t_pow,
           "projected_ratio_at_batch": a.project_batch, "projected_time_ratio": proj, "target_ratio": 1.3}
    print(f"model {a.preset} ({res['model']}), batch {a.batch}, {res['device_name']}, "
          f"{res['threads']} thread(s), {prec}")
    print(f"plain CE step       : {t_plain:8.3f} s  {res['plain_images_per_s']:9.1f} images/s")
    print(f"certified EMMA step : {t_cert:8.3f} s  {res['certified_images_per_s']:9.1f} images/s "
          f"({a.power_iters} power iterations)")
    print(f"time ratio certified/plain: {res['time_ratio']:.3f} (target <= 1.3)")
    print(f"power iteration + its backward alone: {t_pow:.3f} s per step (independent of the batch; "
          "blocks batched, float32)")
    print(f"projected ratio at batch {a.project_batch} (extra cost / {a.project_batch} images): {proj:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
