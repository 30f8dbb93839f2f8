"""Cost of certified training: one EMMA step (with the power iteration's
``--power-iters`` iterations per step, in float32) against a plain
cross-entropy step of the same network, batch and precision, measured side by
side (interleaved; the fastest of ``--steps`` of each kind).

    python benchmarks/train_step.py --preset cifar10 --batch 16 --threads 1
    python benchmarks/train_step.py --preset cifar10 --batch 64 --steps 2 --threads 1

MEASURED (this run): both step times and throughputs (images/s), their
ratio, the certified step's extra seconds, and what that extra is made of:
the no-grad power iterations alone, and the whole Lipschitz term (the
iterations, the differentiable ``||A v||`` per stage, the head's pairwise
norms and their backward) alone.
NOT MEASURED, labelled as such:
* the arithmetic floor: the ratio if every multiply-add of the extra work (the
  batch-1 power iterations and ``||A v||`` with its weight gradient) ran as
  fast as the plain step's (batch-B forward + backward) -- a lower bound on
  the ratio for this batch that no implementation of these mathematics can
  beat unless its batch-1 products run faster than the batched ones;
* the projection to ``--project-batch``: the plain step's time per image kept,
  the extra seconds kept (the power iteration's cost does not grow with the
  batch).
The load average before and after is printed: the machine may be shared
(interleaving and taking the fastest step limit, not remove, the effect).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _macs(model) -> tuple[int, int]:
    """(multiply-adds of one forward of one image through the linear layers
    (body + head), the same for one application of every body stage's
    operator at batch 1) -- the dominant arithmetic; MinMax, biases and the
    normalisations are left out."""
    body = 0
    for st in model.linear_stages():
        m = st.module
        if isinstance(m, torch.nn.Linear):
            body += m.in_features * m.out_features
        else:
            w = m.fused_kernel() if hasattr(m, "fused_kernel") else m.weight
            with torch.no_grad():
                out = st.forward(torch.zeros(1, *st.input_shape, dtype=w.dtype, device=w.device))
            body += out[0].numel() * w[0].numel()
    head = model.head.in_features * model.head.out_features
    return body + head, body


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps of each kind, interleaved; the fastest of each is reported (other "
                         "processes on a shared machine only ever slow a step down)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--power-iters", type=int, default=10)
    ap.add_argument("--power-mode", default="auto", help="auto | gemm | conv | loop (certlib.train.power)")
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
    from certlib.train.power import iterate_
    from certlib.train.step import TrainStep, resolve_precision, strict_fp32

    load_before = os.getloadavg()
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
                            info=DistInfo(), channels_last=cl, power_mode=a.power_mode)

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

    def run_lip():  # the certified step's Lipschitz term alone, with its backward
        m_cert.zero_grad(set_to_none=True)
        cert.margins().sum().backward()

    def run_iter():  # the no-grad power iterations alone
        with strict_fp32(dev):
            iterate_(m_cert, a.power_iters, cert.power.mode)

    for _ in range(a.warmup):
        run_p(), run_c(), run_lip(), run_iter()
    tp, tc, tl, ti = [], [], [], []
    for _ in range(a.steps):  # interleaved: a busy machine slows all kinds alike
        tp.append(timed(run_p))
        tc.append(timed(run_c))
        tl.append(timed(run_lip))
        ti.append(timed(run_iter))
    t_plain, t_cert, t_lip, t_iter = min(tp), min(tc), min(tl), min(ti)
    load_after = os.getloadavg()
    extra = max(t_cert - t_plain, 0.0)

    # not measured: arithmetic floor and projection
    fwd_img, body_op = _macs(base)
    plain_macs = 3 * a.batch * fwd_img                    # forward + input grad + weight grad
    extra_macs = (2 * a.power_iters + 2) * body_op        # iterations, ||A v||, its weight gradient
    floor = 1 + extra_macs / plain_macs
    per_img = t_plain / a.batch
    proj = (per_img * a.project_batch + extra) / (per_img * a.project_batch)

    res = {"preset": a.preset, "model": f"L{c.depth} W{c.width}", "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "precision": prec, "batch": a.batch,
           "power_iters": a.power_iters, "power_mode": cert.power.mode, "steps": a.steps,
           "loadavg_before": load_before[0], "loadavg_after": load_after[0], "cpu_count": os.cpu_count(),
           # measured
           "plain_step_s": t_plain, "certified_step_s": t_cert,
           "plain_images_per_s": a.batch / t_plain, "certified_images_per_s": a.batch / t_cert,
           "time_ratio": t_cert / t_plain, "extra_s": extra,
           "lipschitz_term_s": t_lip, "power_iterations_s": t_iter,
           "power_iteration_s": t_lip,  # the old name of lipschitz_term_s
           # not measured
           "arithmetic_floor_ratio": floor, "plain_step_macs": plain_macs, "extra_macs": extra_macs,
           "projected_ratio_at_batch": a.project_batch, "projected_time_ratio": proj, "target_ratio": 1.3}
    print(f"model {a.preset} ({res['model']}), batch {a.batch}, {res['device_name']}, "
          f"{res['threads']} thread(s), {prec}, power mode {cert.power.mode}; load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} cores")
    print("MEASURED (fastest of", a.steps, "interleaved steps of each kind):")
    print(f"  plain CE step       : {t_plain:8.3f} s  {res['plain_images_per_s']:9.1f} images/s")
    print(f"  certified EMMA step : {t_cert:8.3f} s  {res['certified_images_per_s']:9.1f} images/s "
          f"({a.power_iters} power iterations)")
    print(f"  time ratio certified/plain: {res['time_ratio']:.3f} (target <= 1.3); extra {extra:.3f} s per step")
    print(f"  of which, timed alone: Lipschitz term + its backward {t_lip:.3f} s, of that the no-grad power "
          f"iterations {t_iter:.3f} s (both independent of the batch)")
    print("NOT MEASURED:")
    print(f"  arithmetic floor at batch {a.batch}: {floor:.3f} (extra {extra_macs / 1e9:.1f} G multiply-adds at "
          f"batch 1 / plain step {plain_macs / 1e9:.1f} G at batch {a.batch}, if both ran equally fast)")
    print(f"  projected ratio at batch {a.project_batch} (this run's time per image and extra seconds): "
          f"{proj:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
