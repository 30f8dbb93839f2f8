"""Which verifier bounds a linear operator, and in which form: small
convolutions become their exact explicit matrix (the true zero-padded norm);
SDP size limits are checked up front.  Used by :mod:`certlib.ir.compose`."""

from __future__ import annotations

import numpy as np

from certlib.errors import UnsupportedModelError
from certlib.verifiers.operators import Conv2d, Dense

METHODS = ("exact", "power", "sdp")


#: convolutions whose input and output sizes are both at most this are
#: bounded through their explicit matrix (built exactly by index arithmetic),
#: which gives the true norm of the zero-padded operator instead of the
#: (up to a few % larger) circular-embedding bound.
DENSE_LIMIT = 2048


def conv_matrix(op: Conv2d) -> np.ndarray:
    """The explicit matrix of a Conv2d, each entry copied from one kernel tap
    (no arithmetic, so it is exact).  Rows: output (o, i, j); columns: input (c, y, x)."""
    cin, H, W = op.input_shape
    cout, OH, OW = op.output_shape
    k = op.kernel
    cg, og = k.shape[1], cout // op.groups
    pt, pl, _, _ = op.padding
    M = np.zeros((cout * OH * OW, cin * H * W))
    oi, oj = np.meshgrid(np.arange(OH), np.arange(OW), indexing="ij")
    for a in range(k.shape[2]):
        for b in range(k.shape[3]):
            y = oi * op.stride[0] + a * op.dilation[0] - pt
            x = oj * op.stride[1] + b * op.dilation[1] - pl
            ok = (y >= 0) & (y < H) & (x >= 0) & (x < W)
            pos_out = (oi * OW + oj)[ok]
            pos_in = (y * W + x)[ok]
            for o in range(cout):
                g = o // og
                for c in range(cg):
                    M[o * OH * OW + pos_out, (g * cg + c) * H * W + pos_in] = k[o, c, a, b]
    return M


#: the SDP verifier takes a convolution's explicit matrix when its SDP (on the
#: smaller Gram side, size min(in, out)) is at most this and the matrix fits
#: DENSE_LIMIT; larger convolutions go per DFT frequency block (circular
#: relaxation: sound, a little looser).
SDP_MAX_DIM = 400


def _verifier(method: str):
    """A function op -> Bound for the method (ops as chosen by _explicit_for)."""
    if method == "exact":
        from certlib.verifiers.svd import bound

        return bound
    if method == "power":
        from certlib.verifiers.power import power_bound

        return power_bound
    if method == "sdp":
        from certlib.verifiers.sdp import sdp_bound

        def sdp(op):
            try:
                return sdp_bound(op, max_dim=SDP_MAX_DIM)
            except ValueError as e:
                raise UnsupportedModelError(f"--method sdp cannot bound this operator: {e}") from None
        return sdp
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def _explicit_for(op, method: str):
    """The operator a method is handed: a small convolution becomes its exact
    explicit matrix (true zero-padded norm), anything else stays as it is."""
    if not isinstance(op, Conv2d):
        return op
    if method == "sdp":
        small = min(op.in_dim, op.out_dim) <= SDP_MAX_DIM and max(op.in_dim, op.out_dim) <= DENSE_LIMIT
    else:
        small = op.in_dim <= DENSE_LIMIT and op.out_dim <= DENSE_LIMIT
    return Dense(conv_matrix(op)) if small else op


def _sdp_preflight(g, items) -> None:
    """Refuse up front (before minutes of solving) every operator the SDP
    verifier cannot take, all listed in one error."""
    from certlib.errors import Unsupported
    from certlib.verifiers.sdp import check

    problems = []
    for idx, op, _, label in items:
        if op is None:
            continue
        try:
            check(_explicit_for(op, "sdp"), max_dim=SDP_MAX_DIM)
        except ValueError as e:
            n = g.nodes[idx[0]]
            problems.append(Unsupported(n.name, n.onnx_op, 0, f"{label}: {e} (use --method exact or power)"))
    if problems:
        raise UnsupportedModelError(problems)
