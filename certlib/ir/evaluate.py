"""Float64 evaluation of the IR's index maps and activations (used by
:mod:`certlib.ir.graph`): each function returns its inputs moved, copied, sorted
or, for the activations listed with a nonzero relative error, computed with
that error per entry (proofs/margin_slack.md)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

U64 = 2.0 ** -53  # unit roundoff of IEEE double, round to nearest
#: assumed bound on the relative error of torch's float64 tanh / sigmoid / exp
#: (libm and SLEEF implementations are within a few ulps; this is 2^9 ulps)
LIBM_REL = 2.0 ** -44


def _index(fn: str, p: dict, h: torch.Tensor) -> torch.Tensor:
    if fn == "transpose":
        return h.permute(0, *[int(a) + 1 for a in p["perm"]])
    if fn == "pad":  # p["pads"]: (begin_0..begin_{r-1}, end_0..end_{r-1}) per-sample dims
        pads, r = list(p["pads"]), h.dim() - 1
        flat = []
        for d in reversed(range(r)):
            flat += [pads[d], pads[d + r]]
        return F.pad(h, flat)
    if fn == "gather":  # p["index"]: per per-sample dim, None or the source index of each output entry
        for d, idx in enumerate(p["index"]):
            if idx is not None:
                h = h.index_select(d + 1, torch.as_tensor(np.asarray(idx, dtype=np.int64)))
        return h
    if fn == "slice":  # p["slices"]: one (start, stop, step) per per-sample dim
        return h[(slice(None), *(slice(*s) for s in p["slices"]))]
    b = int(p["blocksize"])
    n, c, H, W = h.shape
    if fn == "space_to_depth":
        t = h.reshape(n, c, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
        return t.reshape(n, c * b * b, H // b, W // b)
    if fn == "depth_to_space":
        if p.get("mode", "DCR") == "DCR":
            t = h.reshape(n, b, b, c // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
        else:
            t = h.reshape(n, c // (b * b), b, b, H, W).permute(0, 1, 4, 2, 5, 3)
        return t.reshape(n, c // (b * b), H * b, W * b)
    raise ValueError(fn)  # pragma: no cover


def _pairs(h: torch.Tensor, adjacent: bool):
    if adjacent:
        t = h.reshape(h.shape[0], h.shape[1] // 2, 2, *h.shape[2:])
        return t[:, :, 0], t[:, :, 1]
    return h.chunk(2, dim=1)


def _minmax(order: str, adjacent: bool):
    def fn(h, p):
        a, b = _pairs(h, adjacent)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        first, second = (hi, lo) if order == "maxmin" else (lo, hi)
        if adjacent:
            return torch.stack([first, second], dim=2).reshape(h.shape)
        return torch.cat([first, second], dim=1)
    return fn


def _sort_groups(h, p):
    """Sort each group of g entries of the (P, g, Q) view (GroupSort-g / FullSort)."""
    v = h.reshape(h.shape[0], p["P"], p["g"], p["Q"])
    return torch.sort(v, dim=2, descending=p.get("descending", True)).values.reshape(h.shape)


def _maxpool(h, p):
    pt, pl, pb, pr = p["pads"]
    if any(p["pads"]):
        h = F.pad(h, (pl, pr, pt, pb), value=-math.inf)
    return F.max_pool2d(h, p["kernel"], p["strides"], 0, p["dilations"], ceil_mode=p.get("ceil_mode", False))


def _const(p, key, like):
    return torch.as_tensor(np.asarray(p[key], dtype=np.float64))


#: activation -> (float64 function, relative rounding error per entry)
ACTIVATIONS = {
    "relu": (lambda h, p: torch.relu(h), 0.0),
    "minmax": (_minmax("maxmin", False), 0.0),       # channel halves (a, b) -> (max, min)
    "minmax_rev": (_minmax("minmax", False), 0.0),   # -> (min, max)
    "minmax_pairs": (_minmax("maxmin", True), 0.0),  # adjacent channels (2k, 2k+1)
    "minmax_pairs_rev": (_minmax("minmax", True), 0.0),
    "abs": (lambda h, p: h.abs(), 0.0),
    "clip": (lambda h, p: h.clamp(p.get("min"), p.get("max")), 0.0),
    # alpha * x rounds once (relative error u) on the negative side
    "leaky_relu": (lambda h, p: torch.where(h >= 0, h, h * p["alpha"]), U64),
    "prelu": (lambda h, p: torch.where(h >= 0, h, h * _const(p, "slope", h)), U64),
    "tanh": (lambda h, p: torch.tanh(h), LIBM_REL),
    "sigmoid": (lambda h, p: torch.sigmoid(h), LIBM_REL),
    "maxpool": (_maxpool, 0.0),
    "groupsort": (_sort_groups, 0.0),   # sorting returns the inputs: exact
}
