"""Bounds of merged blocks (ParallelNode) that are tighter than the generic
composition rule: all-linear add blocks fused into one operator (proofs/residual_fusion.md) and concats of entry selections
(proofs/composition.md).  Used by :mod:`certlib.ir.compose`."""

from __future__ import annotations

import math

import numpy as np

from certlib.bounds import up
from certlib.ir.graph import U64, IndexNode, LinearNode, ParallelNode, ReshapeNode, gamma
from certlib.verifiers.operators import Conv2d, Dense


#: largest block input (entries) whose selection pattern is traced exactly
SELECTION_LIMIT = 1 << 22


def selection_multiplicity(node: ParallelNode) -> int | None:
    """For a concat block whose branches only move, drop or zero-pad entries
    (IndexNode / ReshapeNode chains, or the identity): the largest number of
    times one input entry appears in the output, traced exactly by evaluating
    the block on the entry numbers 1..N (proofs/composition.md).  Else None."""
    if node.merge != "concat" or not all(isinstance(n, (IndexNode, ReshapeNode))
                                         for br in node.branches for n in br):
        return None
    numel = int(np.prod(node.in_shape))
    if numel > SELECTION_LIMIT:
        return None
    import torch

    ids = torch.arange(1, numel + 1, dtype=torch.float64).reshape(1, *node.in_shape)
    out, _ = node.apply(ids, False)
    vals = out.reshape(-1).to(torch.int64)
    vals = vals[vals > 0]
    return int(torch.bincount(vals).max()) if vals.numel() else 1


def _identity_like(op, shape):
    """The identity as an operator of op's kind and geometry, or None."""
    if isinstance(op, Dense):
        m, n = op.weight.shape
        return Dense(np.eye(m)) if m == n else None
    kh, kw = op.kernel.shape[2:]
    pt, pl, pb, pr = op.padding
    (dh, dw), cout = op.dilation, op.kernel.shape[0]
    if op.stride != (1, 1) or op.output_shape != tuple(shape) or op.input_shape != tuple(shape):
        return None
    if pt % dh or pl % dw or pt // dh >= kh or pl // dw >= kw or op.kernel.shape[1] != cout // op.groups:
        return None
    k = np.zeros_like(op.kernel)
    og = cout // op.groups
    for o in range(cout):
        k[o, o % og, pt // dh, pl // dw] = 1.0
    return Conv2d(k, op.input_shape, op.stride, op.padding, op.dilation, op.groups)


def fuse_linear_branches(node: ParallelNode):
    """For an add-merge whose branches are each the identity or one linear
    operator of the same kind and geometry: (the summed operator, number of
    summands per entry); else None."""
    if node.merge != "add":
        return None
    ops = []
    for br in node.branches:
        if len(br) > 1 or (br and not (isinstance(br[0], LinearNode) and not br[0].transposed
                                       and not br[0].weight_rel_err)):
            return None
        ops.append(br[0].op if br else None)
    ref = next((o for o in ops if o is not None), None)
    if ref is None:
        return None
    terms = []
    for o, s in zip(ops, node.signs):
        if o is None:
            o = _identity_like(ref, node.in_shape)
            if o is None:
                return None
        if type(o) is not type(ref):
            return None
        if isinstance(o, Conv2d) and (o.kernel.shape != ref.kernel.shape or o.stride != ref.stride
                                      or o.padding != ref.padding or o.dilation != ref.dilation
                                      or o.groups != ref.groups or o.input_shape != ref.input_shape):
            return None
        if isinstance(o, Dense) and o.weight.shape != ref.weight.shape:
            return None
        terms.append(s * (o.weight if isinstance(o, Dense) else o.kernel))
    total = np.sum(terms, axis=0)
    fused = Dense(total) if isinstance(ref, Dense) else Conv2d(total, ref.input_shape, ref.stride, ref.padding,
                                                              ref.dilation, ref.groups)
    return fused, (np.sum([np.abs(t) for t in terms], axis=0), len(terms))


def sqrt_taps_fro(kernel) -> float:
    """up(sqrt(taps) ||K||_F) for a (c_out, c_in/g, kh, kw) kernel (taps = kh kw)
    or a dense matrix (taps = 1).  It bounds the norm of the conv with kernel K
    (any padding, stride, dilation, groups): ||conv|| <= sum over taps
    ||K_tap||_2 <= sqrt(taps) ||K||_F, since zero-padded shifts and subsampling
    are contractions."""
    K = np.asarray(kernel, dtype=np.float64)
    taps = K.shape[2] * K.shape[3] if K.ndim == 4 else 1
    fro = float(np.linalg.norm(K.ravel())) * (1 + gamma(K.size + 2))
    return up(up(fro * math.sqrt(taps)) * (1 + 4 * U64))


def _sum_rounding_margin(op, terms: tuple) -> float:
    """||E||_2 for E = fl(sum of k kernels) - exact sum: |E| <= gamma_{k-1} sum|K_b|
    entrywise (numpy's sum, any order), so ||E|| <= gamma_{k-1} sqrt_taps_fro(sum|K_b|)
    (proofs/residual_fusion.md)."""
    abs_terms, k = terms
    return up(sqrt_taps_fro(abs_terms) * 1.0001 * gamma(max(k - 1, 1)) * (1 + 4 * U64))


def circular_conv(pad, conv):
    """For a wrap Pad (IndexNode) on H and W followed by a stride-1 conv
    without padding whose output has the input's H x W: (the dilated kernel,
    grid (H, W), groups) of the circular convolution the pair computes, else
    None.  y = C_K(S x) with S a circular shift (unitary), so the pair's norm
    is the circular conv's (proofs/zero_padding.md, circular padding)."""
    if not (isinstance(pad, IndexNode) and pad.fn == "gather" and pad.params.get("mode") == "wrap"
            and isinstance(conv, LinearNode) and isinstance(conv.op, Conv2d) and not conv.transposed
            and not conv.weight_rel_err):
        return None
    op = conv.op
    b, e = pad.params["begin"], pad.params["end"]
    if len(pad.in_shape) != 3 or b[0] or e[0] or op.stride != (1, 1) or any(op.padding):
        return None
    c, H, W = pad.in_shape
    keh, kew = op.effective_kernel_size
    if tuple(op.input_shape) != tuple(pad.out_shape) or b[1] + e[1] != keh - 1 or b[2] + e[2] != kew - 1:
        return None
    K = op.kernel
    dh, dw = op.dilation
    Kd = np.zeros(K.shape[:2] + (keh, kew))
    Kd[:, :, ::dh, ::dw] = K
    return Kd, (H, W), op.groups


def conv_norm_cheap(op: Conv2d) -> float:
    """A cheap bound on ||conv||: sqrt(taps) ||K||_F, rounded up."""
    return sqrt_taps_fro(op.kernel)


def is_crelu(node: ParallelNode) -> bool:
    """concat(relu(x), relu(-x)) (CReLU; deel-torchlip's MaxMin): 1-Lipschitz.
    Per entry, (relu a - relu b)^2 + (relu -a - relu -b)^2 <= (a - b)^2: with
    a, b of one sign one term is |a - b| and the other 0; with a > 0 > b it is
    a^2 + b^2 <= (a - b)^2 since -2ab >= 0 (proofs/activations.md)."""
    from certlib.ir.graph import ActivationNode, AffineNode

    if node.merge != "concat" or len(node.branches) != 2:
        return False

    def relu(n):
        return isinstance(n, ActivationNode) and n.activation == "relu"

    def neg(n):
        return (isinstance(n, AffineNode) and not n.const_err and np.all(np.asarray(n.scale) == -1.0)
                and np.all(np.asarray(n.shift) == 0.0))

    kinds = sorted(len(b) for b in node.branches)
    if kinds != [1, 2]:
        return False
    one, two = sorted(node.branches, key=len)
    return relu(one[0]) and neg(two[0]) and relu(two[1])
