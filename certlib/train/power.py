"""The training-time Lipschitz ESTIMATE, fast: residual blocks batched (or run
one by one where that is faster), every operator's matrix data formed once
per step, and on CUDA optionally the iterations replayed as one CUDA graph.

Same quantity as :meth:`certlib.models.liresnet.LiResNet.lipschitz_estimate`
(per stage: ``n_iter`` persistent power iterations ``u <- A^T A u / ||A^T A u||``
on the stage's ``power_u`` buffer, then ``||A v|| / ||v||`` with ``v`` a
detached copy of the final ``u``; the product over stages), computed
differently.  ``mode`` says how the residual blocks' fused convolutions run:

* ``gemm`` (the default on CUDA): every group of blocks of one shape as
  im2col + ONE batched float32 matrix product, the adjoint being the same with
  flipped, transposed kernels, which runs these batch-1 shapes faster than
  cuDNN's float32 convolutions; the other convolutions (stem, neck) are
  im2col + matrix products too;
* ``conv``: every group of blocks of one shape as ONE grouped convolution
  (``groups`` = number of blocks) and one grouped transposed convolution;
* ``loop`` (the default on CPU for wide blocks): one plain convolution and
  one transposed convolution per block (oneDNN runs a batch-1 512-channel
  convolution ~1.4x faster than its share of one grouped convolution);
* ``fold`` (opt-in, NOT yet timed on a GPU): every group of blocks as ONE
  batched matrix product with all k*k taps stacked as rows ((G, k*k*C, C) @
  (G, C, H*W): a short inner dimension and k*k times more output tiles than
  ``gemm``'s (G, C, k*k*C) @ (G, k*k*C, H*W)), then col2im (``fold``) sums
  the shifted taps; the adjoint the same with the kernels' channels swapped.
  Same arithmetic and memory traffic as ``gemm``, a GEMM shape that may fill
  a large GPU better; slower than ``loop`` on a CPU.

In every mode one call (one training step) forms each operator's matrix
data ONCE: each block's fused kernel (stacked per group) is built once, with
autograd, and shared by the no-grad iterations and by the one differentiable
``||A v||`` per stage (which gets gradients through that same kernel); the
adjoint's rearranged copy (``gemm``, ``fold``) is made once per call, not
per iteration.  The final iterate is used
as ``v`` directly (it is a fresh tensor, never a buffer, so the in-place
buffer updates of a later step or of the DDP broadcast cannot corrupt the
pending backward) -- the values are exactly those of a clone of the buffer.
:class:`PowerIteration` with ``cuda_graph=True`` captures the no-grad
iterations once and replays them (hundreds of small kernels, one launch).

Like the model's version it is a lower estimate (never a certificate), runs
in the buffers' dtype (float32; callers turn autocast and TF32 off, see
:func:`certlib.train.step.strict_fp32`), updates the buffers in place under
``no_grad`` and is differentiable in the weights.  Modes differ only in
floating-point rounding (summation order); one mode is deterministic on CPU,
so a resumed run repeats an uninterrupted one bitwise.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from certlib.models.layers import POWER_BUFFER, LinearResidualConv

MODES = ("auto", "gemm", "conv", "loop", "fold")

#: CPU ``auto`` runs blocks one by one (``loop``) from this many channels on.
#: Measured on one CPU thread (AVX-512, oneDNN), 10 iterations + backward,
#: 16x16 blocks, CPU seconds conv / loop: 6 blocks W64 0.034 / 0.048, W128
#: 0.093 / 0.098, W256 0.35 / 0.33; 12 blocks W512 3.4 / 2.4 (gemm 2.8).
#: Narrower models (digits: W32) keep the grouped call: their runs are unchanged.
LOOP_MIN_CHANNELS = 256


class _BlockOps:
    """G residual blocks of one shape (C channels, k x k, stride 1, padding
    p, input H x W) as one operator on ``u`` (1, G*C, H, W).

    ``kernel()`` is the stacked fused kernel (G*C, C, k, k), built once per
    step (differentiable); ``fwd_data`` / ``adj_data`` turn it into what
    ``fwd(u, d)`` / ``adj(y, d)`` read.  ``conv``: grouped conv2d /
    conv_transpose2d.  ``gemm``: im2col + one batched matrix product, the
    adjoint being the same with each kernel's channels swapped and taps
    flipped (exact for stride 1, padding (k-1)/2, borders included).
    ``fold``: one batched product per tap-stacked kernel, then col2im: the
    forward's rows are (out channel, flipped tap), the adjoint's (in channel,
    tap) -- ``fold`` adds the tap at (i, j) shifted by (i - p, j - p)."""

    def __init__(self, idx: list[int], mods, C: int, k: int, p: int, hw: tuple[int, int], mode: str):
        self.idx, self.mods, self.G, self.C, self.k, self.p = idx, mods, len(idx), C, k, p
        self.H, self.W = hw
        self.gemm, self.fold = mode == "gemm", mode == "fold"

    def kernel(self) -> torch.Tensor:
        if self.G == 1:
            return self.mods[0].fused_kernel()
        return torch.cat([m.fused_kernel() for m in self.mods])

    def fwd_data(self, w):
        G, C, k = self.G, self.C, self.k
        if self.fold:
            return w.reshape(G, C, C, k, k).flip(-1, -2).permute(0, 1, 3, 4, 2).reshape(G, C * k * k, C)
        return w.reshape(G, C, C * k * k) if self.gemm else w

    def adj_data(self, w):
        G, C, k = self.G, self.C, self.k
        if self.fold:
            return w.reshape(G, C, C, k, k).permute(0, 2, 3, 4, 1).reshape(G, C * k * k, C)
        if not self.gemm:
            return w
        return w.reshape(G, C, C, k, k).transpose(1, 2).flip(-1, -2).reshape(G, C, C * k * k)

    def _apply(self, u, m):
        G, C, H, W = self.G, self.C, self.H, self.W
        cols = F.unfold(u.reshape(G, C, H, W), self.k, padding=self.p)    # (G, C*k*k, H*W)
        return torch.bmm(m, cols).reshape(1, G * C, H, W)

    def _taps(self, u, m):
        G, C, H, W = self.G, self.C, self.H, self.W
        z = torch.bmm(m, u.reshape(G, C, H * W))                          # (G, C*k*k, H*W)
        return F.fold(z, (H, W), self.k, padding=self.p).reshape(1, G * C, H, W)

    def fwd(self, u, d):
        if self.fold:
            return self._taps(u, d)
        return self._apply(u, d) if self.gemm else F.conv2d(u, d, None, 1, self.p, 1, self.G)

    def adj(self, y, d):
        if self.fold:
            return self._taps(y, d)
        return self._apply(y, d) if self.gemm else F.conv_transpose2d(y, d, None, 1, self.p, 0, self.G)


class _StageOps:
    """One other body stage (stem conv, neck conv, neck dense).  ``gemm``
    writes convolutions as im2col (``unfold``) + one matrix product and the
    adjoint as the transposed product + col2im (``fold``, which also
    zero-fills rows/columns the convolution never reads): the same linear maps
    as conv2d / its adjoint.  Otherwise the stage's own forward / adjoint."""

    def __init__(self, i: int, st, mode: str):
        self.i, self.st = i, st
        m = st.module
        self.gemm = mode in ("gemm", "fold") and isinstance(m, torch.nn.Conv2d)
        if self.gemm:
            self.C_out, self.ks, self.s, self.p = m.out_channels, m.kernel_size, m.stride, m.padding
            self.H, self.W = st.input_shape[1:]
            k, s, p = self.ks, self.s, self.p
            self.oh = (self.H + 2 * p[0] - k[0]) // s[0] + 1
            self.ow = (self.W + 2 * p[1] - k[1]) // s[1] + 1

    def data(self):
        return self.st.module.weight.reshape(self.C_out, -1) if self.gemm else None

    def fwd(self, u, w):
        if not self.gemm:
            return self.st.forward(u)
        return (w @ F.unfold(u, self.ks, padding=self.p, stride=self.s)[0]).reshape(1, self.C_out, self.oh, self.ow)

    def adj(self, y, w):
        if not self.gemm:
            return self.st.adjoint(y)
        return F.fold((w.t() @ y.reshape(self.C_out, -1))[None], (self.H, self.W), self.ks, padding=self.p,
                      stride=self.s)


def _resolve(model, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"power mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if next(model.buffers()).is_cuda:
        return "gemm"
    widths = [st.module.channels for st in model.linear_stages() if isinstance(st.module, LinearResidualConv)]
    return "loop" if widths and min(widths) >= LOOP_MIN_CHANNELS else "conv"


class _Plan:
    """The model's stages split into block operators (batched per shape, or
    one per block in ``loop``) and the single other stages.  Holds modules,
    never tensors: parameters and buffers are read at call time."""

    def __init__(self, model, mode: str):
        self.mode = mode
        self.stages = stages = model.linear_stages()
        groups: dict = {}
        for i, st in enumerate(stages):
            m = st.module
            if isinstance(m, LinearResidualConv):
                key = i if mode == "loop" else (m.channels, m.kernel_size, tuple(st.input_shape))
                groups.setdefault(key, []).append(i)
        self.blocks = []
        for idx in groups.values():
            b = stages[idx[0]].module
            self.blocks.append(_BlockOps(idx, [stages[i].module for i in idx], b.channels, b.kernel_size,
                                         b.padding, tuple(stages[idx[0]].input_shape[1:]), mode))
        grouped = {i for g in groups.values() for i in g}
        self.singles = [_StageOps(i, stages[i], mode) for i in range(len(stages)) if i not in grouped]


def _iterate_block(b: _BlockOps, kernel: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``n_iter`` no-grad iterations of block group ``b`` with its (stacked)
    fused ``kernel``; writes the buffers, returns the final iterate
    (1, G*C, H, W), a fresh tensor (a copy of the buffer when ``n_iter`` is 0)."""
    G, C = b.G, b.C
    bufs = [getattr(m, POWER_BUFFER) for m in b.mods]
    with torch.no_grad():
        u = bufs[0].clone() if G == 1 else torch.cat(bufs, dim=1)         # (1, G*C, H, W)
        if n_iter <= 0:
            return u
        fd, ad = b.fwd_data(kernel), b.adj_data(kernel)
        tiny = torch.finfo(u.dtype).tiny
        for _ in range(int(n_iter)):
            x = b.adj(b.fwd(u, fd), ad).reshape(G, -1)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            u = torch.where(norm > 0, x / norm.clamp_min(tiny), u.reshape(G, -1)).reshape(u.shape)
        if G == 1:
            bufs[0].copy_(u)
        else:
            for g, buf in enumerate(bufs):
                buf.copy_(u[:, g * C:(g + 1) * C])
    return u


def _iterate_single(s: _StageOps, w, n_iter: int) -> None:
    """certlib.models.layers.power_iteration's loop, with the matrix data ``w``."""
    u = getattr(s.st.module, POWER_BUFFER)
    tiny = torch.finfo(u.dtype).tiny
    with torch.no_grad():
        for _ in range(int(n_iter)):
            x = s.adj(s.fwd(u, w), w)
            norm = torch.linalg.vector_norm(x)
            u.copy_(torch.where(norm > 0, x / norm.clamp_min(tiny), u))


def _block_sigmas(b: _BlockOps, kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(G,) ``||A_g v_g|| / ||v_g||``, differentiable through ``kernel``."""
    y = b.fwd(v, b.fwd_data(kernel))
    v_norm = torch.linalg.vector_norm(v.reshape(b.G, -1), dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return torch.linalg.vector_norm(y.reshape(b.G, -1), dim=1) / v_norm


def _single_sigma(s: _StageOps, w) -> torch.Tensor:
    v = getattr(s.st.module, POWER_BUFFER).detach().clone()
    v_norm = torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)
    return torch.linalg.vector_norm(s.fwd(v, w)) / v_norm


def _estimate(plan: _Plan, n_iter: int, iterate: bool = True) -> torch.Tensor:
    """The product of the stage estimates after ``n_iter`` iterations (none
    when ``iterate`` is False: the buffers were advanced already)."""
    out: list = [None] * len(plan.stages)
    for b in plan.blocks:
        kernel = b.kernel()                                   # once: iterations and sigma share it
        v = _iterate_block(b, kernel, n_iter if iterate else 0)
        sig = _block_sigmas(b, kernel, v)
        for j, i in enumerate(b.idx):
            out[i] = sig[j]
    for s in plan.singles:
        w = s.data()
        if iterate:
            _iterate_single(s, w, n_iter)
        out[s.i] = _single_sigma(s, w)
    return torch.stack(out).prod()


def iterate_(model, n_iter: int, mode: str = "auto") -> None:
    """``n_iter`` power iterations on every stage's buffer, in place (no grad)."""
    plan = _Plan(model, _resolve(model, mode))
    with torch.no_grad():
        for b in plan.blocks:
            _iterate_block(b, b.kernel(), n_iter)
        for s in plan.singles:
            _iterate_single(s, s.data(), n_iter)


def stage_sigmas(model, mode: str = "auto") -> list[torch.Tensor]:
    """``||A v|| / ||v||`` per stage (model order), ``v`` = copy of the buffer;
    differentiable in the weights."""
    plan = _Plan(model, _resolve(model, mode))
    out: list = [None] * len(plan.stages)
    for b in plan.blocks:
        kernel = b.kernel()
        sig = _block_sigmas(b, kernel, _iterate_block(b, kernel, 0))
        for j, i in enumerate(b.idx):
            out[i] = sig[j]
    for s in plan.singles:
        out[s.i] = _single_sigma(s, s.data())
    return out


def lipschitz_estimate(model, n_iter: int = 10, mode: str = "auto") -> torch.Tensor:
    """ESTIMATE of the body's l2 Lipschitz constant (product of the stage
    estimates) after ``n_iter`` more iterations; see the module docstring."""
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    return _estimate(_Plan(model, _resolve(model, mode)), n_iter)


class PowerIteration:
    """``L = PowerIteration(model, n_iter)()`` per training step: the same
    estimate as :func:`lipschitz_estimate` (the stage plan is built once).
    With ``cuda_graph`` the no-grad iterations are captured on the first call
    and replayed afterwards (the graph reads the parameters and buffers in
    place, which the trainer never reallocates; the replayed iterations build
    their own copy of the fused kernels).  Falls back to eager execution if
    capture fails."""

    def __init__(self, model, n_iter: int, mode: str = "auto", cuda_graph: bool = False):
        if n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        self.model, self.n_iter = model, int(n_iter)
        self.mode = _resolve(model, mode)
        self.plan = _Plan(model, self.mode)
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
            return _estimate(self.plan, self.n_iter, iterate=False)
        return _estimate(self.plan, self.n_iter)
