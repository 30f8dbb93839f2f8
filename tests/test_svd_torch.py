"""The exact method's convolution engine in torch (verifiers/svd_torch.py,
``--device``): on device=cpu it proves the same bounds as the numpy engine
(to ~1e-12 relative: only summation orders differ) and never below the true
norm of the explicit matrix."""

import numpy as np
import pytest

from certlib.verifiers.operators import Conv2d
from certlib.verifiers.svd import conv_bound, on_device

CASES = [  # (c_out, c_in, k, n, stride, padding, dilation, groups)
    (4, 3, 3, 6, 1, 1, 1, 1),
    (6, 4, 3, 7, 2, 1, 1, 2),
    (5, 2, 2, 5, 1, 0, 2, 1),
    (3, 3, 5, 3, 1, 2, 1, 1),   # n < k
    (48, 48, 3, 4, 1, 1, 1, 1),  # Grams of 48 x 48 (the numpy engine's herk branch)
]


def _op(case, scale, seed=0):
    c_out, c_in, k, n, s, p, d, g = case
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(c_out, c_in // g, k, k)) * scale
    return Conv2d(K, stride=(s, s), padding=(p, p, p, p), dilation=(d, d), groups=g, input_shape=(c_in, n, n))


def _true_norm(op):
    return float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -60, 2.0 ** 60])
def test_torch_engine_matches_numpy_and_bounds_the_norm(case, scale):
    op = _op(case, scale)
    ref = conv_bound(op)
    with on_device("cpu", torch_on_cpu=True):
        tb = conv_bound(op)
    assert tb.value == pytest.approx(ref.value, rel=1e-12, abs=0)
    truth = _true_norm(op)
    assert tb.value >= truth and ref.value >= truth


def test_on_device_cpu_keeps_numpy_engine(monkeypatch):
    import certlib.verifiers.svd_torch as st

    def boom(*a, **k):
        raise AssertionError("torch engine used")

    monkeypatch.setattr(st, "block_max", boom)
    with on_device("cpu"):
        conv_bound(_op(CASES[0], 1.0))
    with pytest.raises(AssertionError, match="torch engine"), on_device("cpu", torch_on_cpu=True):
        conv_bound(_op(CASES[0], 1.0))
