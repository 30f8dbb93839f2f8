"""One training step and the training-time evaluation, shared by the trainer
and the benchmarks (benchmarks/train_step.py, benchmarks/gpu_check.py).

Precision: the network's forward/backward may run under bf16 autocast (and
TF32); the power iteration, the Lipschitz estimate, the head's pairwise norms
and the loss's margins always run in strict float32 (autocast off, TF32 off).
``fp64`` runs everything in float64 (a reference mode: rounding noise is too
small for AdamW to amplify, so runs that differ only in summation order, e.g.
1 vs N ranks, agree to ~1e-12).
Everything here is a training-time ESTIMATE: sound numbers come only from
the final export + verification (certlib.verify).
"""

from __future__ import annotations

import contextlib

import torch

from certlib.train import losses
from certlib.train.power import PowerIteration, lipschitz_estimate
from certlib.train.distributed import DistInfo, all_reduce_sum, broadcast_
from certlib.models.layers import POWER_BUFFER


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere.  Enables TF32 for the
    network's float32 matmuls/convs when the precision is tf32 or bf16."""
    p = ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = p in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = p in ("tf32", "bf16")
        torch.backends.cudnn.benchmark = True
    return p


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """Autocast off and TF32 off: true float32 for power iteration and bounds."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def param_dtype(precision: str) -> torch.dtype:
    return torch.float64 if precision == "fp64" else torch.float32


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def power_buffers(model) -> list[torch.Tensor]:
    return [getattr(st.module, POWER_BUFFER) for st in model.linear_stages()]


def margin_constants(model, n_iter: int, device: torch.device, mode: str = "auto") -> torch.Tensor:
    """K (C, C) = L_body ESTIMATE * ||w_i - w_j||, in strict float32; advances
    the persistent power-iteration vectors ``n_iter`` times; differentiable."""
    with strict_fp32(device):
        return lipschitz_estimate(model, n_iter, mode) * model.pairwise_head_norms()


def certified_estimate(logits: torch.Tensor, labels: torch.Tensor, K: torch.Tensor, eps: float) -> torch.Tensor:
    """Per sample: correct and margin > eps K against every other class (with
    ESTIMATED K: not a certificate)."""
    pred = logits.argmax(1)
    gap = logits.gather(1, pred[:, None]) - logits
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, pred[:, None], False)
    ok = torch.where(others, gap > eps * K[pred], torch.ones_like(others)).all(1)
    return ok & (pred == labels)


class TrainStep:
    """``step(x, y, n_global, eps, lr)`` runs forward (``net``: the model, its
    DDP wrapper or a compiled version), the Lipschitz estimate, the loss,
    backward, clipping and the AdamW update; returns a device tensor
    ``[loss_sum, correct, certified_estimate, count]`` over this rank's samples.

    CUDA only: ``overlap`` runs the power iteration on a side stream while the
    network's forward runs on the main one (they share no data: the same
    operations, the same numbers; measured on an H100, L12 W512, batch 256:
    54.7 -> 51.0 ms per step); ``cuda_graph`` replays its iterations as one
    CUDA graph (off: it saved nothing measurable per step there, and a graph
    silently reads stale memory if parameters are ever reallocated).
    ``power_mode``: see certlib.train.power.  Nothing in the step makes the
    host wait for the device (no ``.item()``, no blocking host->device
    copies): the returned counters stay on the device until the caller reads
    them."""

    def __init__(self, model, net, opt, *, loss: str, trades_lambda: float, power_iters: int, grad_clip: float,
                 test_eps: float, device: torch.device, precision: str, info: DistInfo,
                 channels_last: bool = False, overlap: bool = True, cuda_graph: bool = False,
                 power_mode: str = "auto"):
        self.model, self.net, self.opt = model, net, opt
        self.loss_name = loss
        self.loss_fn = losses.get(loss, trades_lambda)
        self.power_iters, self.grad_clip, self.test_eps = power_iters, grad_clip, test_eps
        self.device, self.precision, self.info = device, precision, info
        self.channels_last = channels_last
        self.dtype = param_dtype(precision)
        self.buffers = power_buffers(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.power = PowerIteration(model, power_iters, power_mode, cuda_graph=cuda_graph)
        # high priority: its kernels fill the GPU first, the network's fill the gaps
        self.side = torch.cuda.Stream(device, priority=-1) if overlap and device.type == "cuda" else None
        if self.side is not None and hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
            # parameters get gradients from both streams; autograd synchronises them (correct, expected)
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)

    def margins(self) -> torch.Tensor:
        with strict_fp32(self.device):
            return self.power() * self.model.pairwise_head_norms()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, n_global: int, eps: float, lr: float) -> torch.Tensor:
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        need_k = self.loss_name != "ce"
        if need_k and self.side is not None:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # the weights of the last optimizer step
            with torch.cuda.stream(self.side):
                K = self.margins()
        with autocast(self.device, self.precision):
            logits = self.net(x)
        logits = logits.to(self.dtype)
        if not need_k:
            C = logits.shape[1]
            K = torch.zeros(C, C, device=logits.device, dtype=self.dtype)
        else:
            if self.side is not None:
                main.wait_stream(self.side)
                K.record_stream(main)
            else:
                K = self.margins()
            broadcast_(self.buffers, self.info)  # identical vectors on every rank
        with strict_fp32(self.device):
            total = self.loss_fn(logits, y, K, eps, reduction="sum")
        loss = total * (self.info.world / max(n_global, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
            cert = certified_estimate(logits, y, K.detach(), self.test_eps).sum() if self.loss_name != "ce" \
                else torch.zeros((), device=logits.device, dtype=torch.long)
            # torch.full, not torch.tensor(...): a host->device copy would wait for the whole step
            return torch.stack([total.detach(), correct.float(), cert.float(),
                                torch.full((), float(len(y)), device=logits.device)])


@torch.no_grad()
def evaluate(model, batches, eps_list: list[float], *, eval_power_iters: int, device: torch.device,
             precision: str, info: DistInfo, channels_last: bool = False) -> dict:
    """Clean accuracy and the training-time VRA ESTIMATE (power iteration, not
    sound) over ``batches`` (this rank's share; counts are summed over ranks).

    The Lipschitz estimate continues the persistent vectors for
    ``eval_power_iters`` more iterations on COPIES: training state is untouched."""
    bufs = power_buffers(model)
    saved = [b.clone() for b in bufs]
    try:
        with strict_fp32(device):
            L = lipschitz_estimate(model, eval_power_iters)
            K = L * model.pairwise_head_norms()
    finally:
        for b, s in zip(bufs, saved):
            b.copy_(s)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2 + len(eps_list), dtype=torch.float64, device=device)
    for x, y in batches:
        x = x.to(param_dtype(precision))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            f = model(x)
        f = f.to(K.dtype)
        counts[0] += len(y)
        counts[1] += (f.argmax(1) == y).sum()
        for k, e in enumerate(eps_list):
            counts[2 + k] += certified_estimate(f, y, K, e).sum()
    model.train(was_training)
    all_reduce_sum(counts, info)
    n = max(float(counts[0]), 1.0)
    vra = {f"{e:.6g}": float(counts[2 + k]) / n for k, e in enumerate(eps_list)}
    return {"clean_accuracy": float(counts[1]) / n, "vra_estimate": vra[f"{eps_list[0]:.6g}"],
            "vra_estimate_at": vra, "lipschitz_estimate": float(L), "eval_samples": int(counts[0])}
