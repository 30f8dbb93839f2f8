"""The training-time Lipschitz ESTIMATE, fast: residual blocks batched, and on
CUDA the iterations replayed as one CUDA graph.

Same quantity as :meth:`certlib.models.liresnet.LiResNet.lipschitz_estimate`
(per stage: ``n_iter`` persistent power iterations ``u <- A^T A u / ||A^T A u||``
on the stage's ``power_u`` buffer, then ``||A v|| / ||v||`` with ``v`` a
detached clone of the final ``u``; the product over stages), computed
differently:

* every group of residual blocks of one shape runs at once: as ONE grouped
  convolution (``groups`` = number of blocks) and one grouped transposed
  convolution, or (``gemm``, the default on CUDA) as im2col + ONE batched
  float32 matrix product, the adjoint being the same with flipped, transposed
  kernels, which runs these batch-1 shapes faster than cuDNN's float32
  convolutions; each block's fused kernel
  is formed once per call, not twice per iteration; in ``gemm`` mode the
  other convolutions (stem, neck) are im2col + matrix products too;
* :class:`PowerIteration` with ``cuda_graph=True`` captures the no-grad
  iterations once and replays them (hundreds of small kernels, one launch).

Like the model's version it is a lower estimate (never a certificate), runs
in the buffers' dtype (float32; callers turn autocast and TF32 off, see
:func:`certlib.train.step.strict_fp32`), updates the buffers in place under
``no_grad`` and is differentiable in the weights.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from certlib.models.layers import POWER_BUFFER, LinearResidualConv


def _block_groups(stages) -> list[list[int]]:
    groups: dict = {}
    for i, st in enumerate(stages):
        m = st.module
        if isinstance(m, LinearResidualConv):
            groups.setdefault((m.channels, m.kernel_size, tuple(st.input_shape)), []).append(i)
    return [v for v in groups.values() if len(v) > 1]


def _conv_ops(G: int, C: int, k: int, p: int, hw: tuple[int, int], mode: str):
    """(prepare, forward, adjoint) of G independent stride-1 convolutions
    with kernels ``w`` (G*C, C, k, k) on ``u`` (1, G*C, H, W):
    ``ops = prepare(w, adjoint)`` once per call, then ``forward(u, ops)`` /
    ``adjoint(y, ops)``.  ``conv``: grouped conv2d / conv_transpose2d.
    ``gemm``: im2col + one batched matrix product, the adjoint being the same
    with each kernel's channels swapped and taps flipped (exact for stride 1,
    padding (k-1)/2, borders included): the same linear maps."""
    H, W = hw
    if mode == "conv":
        def prepare(w, adjoint=True):
            return w

        def fwd(u, w):
            return F.conv2d(u, w, None, 1, p, 1, G)

        def adj(y, w):
            return F.conv_transpose2d(y, w, None, 1, p, 0, G)
        return prepare, fwd, adj

    def prepare(w, adjoint=True):
        wf = w.reshape(G, C, C * k * k)
        if not adjoint:
            return wf, None
        wt = w.reshape(G, C, C, k, k).transpose(1, 2).flip(-1, -2).reshape(G, C, C * k * k)
        return wf, wt

    def _apply(u, m):
        cols = F.unfold(u.reshape(G, C, H, W), k, padding=p)             # (G, C*k*k, H*W)
        return torch.bmm(m, cols).reshape(1, G * C, H, W)

    def fwd(u, ops):
        return _apply(u, ops[0])

    def adj(y, ops):
        return _apply(y, ops[1])
    return prepare, fwd, adj


def _single_ops(st, mode: str):
    """(prepare, forward, adjoint) of one body stage: ``prepare()`` returns
    the operator's matrix data once per call; ``gemm`` writes convolutions as
    im2col (``unfold``) + one matrix product and the adjoint as the transposed
    product + col2im (``fold``, which also zero-fills rows/columns the
    convolution never reads): the same linear maps as conv2d / its adjoint."""
    m = st.module
    if mode != "gemm" or not isinstance(m, torch.nn.Conv2d):
        return (lambda: None), (lambda u, w: st.forward(u)), (lambda y, w: st.adjoint(y))
    C_out = m.out_channels
    k, s, p = m.kernel_size, m.stride, m.padding
    H, W = st.input_shape[1:]
    oh, ow = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1

    def prepare():
        return m.weight.reshape(C_out, -1)

    def fwd(u, w):
        return (w @ F.unfold(u, k, padding=p, stride=s)[0]).reshape(1, C_out, oh, ow)

    def adj(y, w):
        return F.fold((w.t() @ y.reshape(C_out, -1))[None], (H, W), k, padding=p, stride=s)
    return prepare, fwd, adj


def _resolve(model, mode: str) -> str:
    if mode == "auto":
        return "gemm" if next(model.buffers()).is_cuda else "conv"
    if mode not in ("gemm", "conv"):
        raise ValueError(f"power mode must be auto, gemm or conv, got {mode!r}")
    return mode


def _plan(model, mode: str):
    """[(group stage indices, forward, adjoint, channels)] and the single stages."""
    stages = model.linear_stages()
    groups = []
    for idx in _block_groups(stages):
        b = stages[idx[0]].module
        ops = _conv_ops(len(idx), b.channels, b.kernel_size, b.padding, tuple(stages[idx[0]].input_shape[1:]), mode)
        groups.append((idx, *ops, b.channels))
    grouped = {i for g in groups for i in g[0]}
    singles = [(i, *_single_ops(stages[i], mode)) for i in range(len(stages)) if i not in grouped]
    return stages, groups, singles


@torch.no_grad()
def iterate_(model, n_iter: int, mode: str = "auto") -> None:
    """``n_iter`` power iterations on every stage's buffer, in place."""
    stages, groups, singles = _plan(model, _resolve(model, mode))
    for idx, prepare, fwd, adj, C in groups:
        G = len(idx)
        w = prepare(torch.cat([stages[i].module.fused_kernel() for i in idx]).contiguous())
        bufs = [getattr(stages[i].module, POWER_BUFFER) for i in idx]
        u = torch.cat(bufs, dim=1).contiguous()                           # (1, G*C, H, W)
        tiny = torch.finfo(u.dtype).tiny
        for _ in range(int(n_iter)):
            x = adj(fwd(u, w), w).reshape(G, -1)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            u = torch.where(norm > 0, x / norm.clamp_min(tiny), u.reshape(G, -1)).reshape(u.shape)
        for g, b in enumerate(bufs):
            b.copy_(u[:, g * C:(g + 1) * C])
    for i, prepare, fwd, adj in singles:  # certlib.models.layers.power_iteration's loop
        u = getattr(stages[i].module, POWER_BUFFER)
        w = prepare()
        tiny = torch.finfo(u.dtype).tiny
        for _ in range(int(n_iter)):
            x = adj(fwd(u, w), w)
            norm = torch.linalg.vector_norm(x)
            u.copy_(torch.where(norm > 0, x / norm.clamp_min(tiny), u))


def stage_sigmas(model, mode: str = "auto") -> list[torch.Tensor]:
    """``||A v|| / ||v||`` per stage (model order), ``v`` = clone of the buffer;
    differentiable in the weights."""
    stages, groups, singles = _plan(model, _resolve(model, mode))
    out: list = [None] * len(stages)
    for idx, prepare, fwd, _, _ in groups:
        G = len(idx)
        kernel = prepare(torch.cat([stages[i].module.fused_kernel() for i in idx]).contiguous(), adjoint=False)
        v = torch.cat([getattr(stages[i].module, POWER_BUFFER) for i in idx], dim=1).detach().clone()
        y = fwd(v, kernel)
        v_norm = torch.linalg.vector_norm(v.reshape(G, -1), dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        sig = torch.linalg.vector_norm(y.reshape(G, -1), dim=1) / v_norm
        for j, i in enumerate(idx):
            out[i] = sig[j]
    for i, prepare, fwd, _ in singles:
        v = getattr(stages[i].module, POWER_BUFFER).detach().clone()
        v_norm = torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)
        out[i] = torch.linalg.vector_norm(fwd(v, prepare())) / v_norm
    return out


def lipschitz_estimate(model, n_iter: int = 10, mode: str = "auto") -> torch.Tensor:
    """ESTIMATE of the body's l2 Lipschitz constant (product of the stage
    estimates) after ``n_iter`` more iterations; see the module docstring."""
    iterate_(model, n_iter, mode)
    return torch.stack(stage_sigmas(model, mode)).prod()


class PowerIteration:
    """``L = PowerIteration(model, n_iter)()`` per training step: the same
    estimate as :func:`lipschitz_estimate`; with ``cuda_graph`` the no-grad
    iterations are captured on the first call and replayed afterwards (the
    graph reads the parameters and buffers in place, which the trainer never
    reallocates).  Falls back to eager execution if capture fails."""

    def __init__(self, model, n_iter: int, mode: str = "auto", cuda_graph: bool = False):
        self.model, self.n_iter = model, int(n_iter)
        self.mode = _resolve(model, mode)
        self.use_graph = bool(cuda_graph) and next(model.buffers()).is_cuda and self.n_iter > 0
        self.graph = None

    def _capture(self) -> None:
        bufs = [getattr(st.module, POWER_BUFFER) for st in self.model.linear_stages()]
        saved = [b.clone() for b in bufs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuBLAS/cuDNN handles and workspaces
                    iterate_(self.model, self.n_iter, self.mode)
                torch.cuda.current_stream().synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=side):
                    iterate_(self.model, self.n_iter, self.mode)
            self.graph = g
        except Exception as e:  # pragma: no cover - depends on the CUDA stack
            warnings.warn(f"power iteration: CUDA graph capture failed ({e}); running eagerly")
            self.use_graph = False
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for b, s in zip(bufs, saved):
                    b.copy_(s)

    def __call__(self) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            iterate_(self.model, self.n_iter, self.mode)
        return torch.stack(stage_sigmas(self.model, self.mode)).prod()
