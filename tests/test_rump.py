"""Rump's verified positive-definiteness criterion and the norm proofs built on it.

Oracle: numpy's float64 eigen/singular values.  Soundness is asserted exactly: a
matrix the criterion accepts must be PD, a norm it proves must be >= the truth.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib.verifiers import rump
from certlib.verifiers.operators import Dense

SETTINGS = settings(max_examples=40, deadline=None)


def _spd(rng, n, cond_shift=1.0):
    B = rng.standard_normal((n, n))
    A = B.T @ B + cond_shift * np.eye(n)
    return np.triu(A) + np.triu(A, 1).T          # exactly symmetric


def test_constants_and_gamma():
    assert rump.U == 2.0 ** -53 and rump.ETA == 2.0 ** -1074 and rump.SAFETY >= 1
    assert rump.gamma(1) >= rump.U / (1 - rump.U)
    assert rump.gamma(10) >= 10 * rump.U / (1 - 10 * rump.U)
    assert rump.down(1.0) < 1.0
    # c grows like n u tr(A) and is dominated by it for normal-range matrices
    c = rump.rump_shift(100, 100.0, 1.0)
    assert 101 * rump.U * 100 <= c <= 4 * 101 * rump.U * 100 * rump.SAFETY


def test_accepts_clearly_pd():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 60):
        assert rump.is_spd(np.eye(n))
        assert rump.is_spd(_spd(rng, n))
    A = np.full((30, 30), 0.5) + 20 * np.eye(30)    # diagonally dominant
    assert rump.is_spd(A)
    assert rump.is_spd(np.diag([1.0, 1e-10, 3.0]))  # PD by far more than rounding


def test_rejects_indefinite_and_singular():
    rng = np.random.default_rng(1)
    assert not rump.is_spd(np.array([[1.0, 2.0], [2.0, 1.0]]))
    assert not rump.is_spd(np.zeros((3, 3)))
    assert not rump.is_spd(np.diag([1.0, 0.0, 1.0]))
    assert not rump.is_spd(np.diag([1.0, -1e-300, 1.0]))
    assert not rump.is_spd(np.ones((4, 4)))               # rank one
    for n, r in ((10, 5), (40, 39), (25, 1)):
        B = rng.standard_normal((r, n))
        A = B.T @ B                                       # rank deficient (exactly PSD singular)
        A = np.triu(A) + np.triu(A, 1).T
        assert not rump.is_spd(A)


def test_rejects_pd_by_less_than_rounding():
    from fractions import Fraction

    rng = np.random.default_rng(2)
    for n in (2, 10, 30):
        A = _spd(rng, n)
        lam = np.linalg.eigvalsh(A).min()
        tr = np.trace(A)
        # lambda_min shifted to ~ -1e-14 (indefinite), ~0 (singular), and ~ +1e-16 tr
        # (PD by far less than the criterion's margin c >= 2 (n+1) u tr)
        for shift in (lam + 1e-14, lam, lam - 1e-16 * tr):
            assert not rump.is_spd(A - shift * np.eye(n))
        # lambda_min ~ +1e-14: PD; may be accepted (n = 2: c ~ 4e-15 tr) but only if it is PD
        S = A - (lam - 1e-14) * np.eye(n)
        if rump.is_spd(S) and n == 2:
            a, b, c = (Fraction(float(x)) for x in (S[0, 0], S[0, 1], S[1, 1]))
            assert a > 0 and a * c - b * b > 0              # exact rational check
    assert not rump.is_spd(np.diag([1.0] * 9 + [1e-16]))    # PD, but by less than c
    Q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    A = (Q * np.r_[np.ones(19), 1e-14]) @ Q.T
    assert not rump.is_spd(np.triu(A) + np.triu(A, 1).T)


def test_input_checks():
    assert rump.is_spd(np.zeros((0, 0)))
    with pytest.raises(ValueError):
        rump.is_spd(np.array([[1.0, 0.1], [0.2, 1.0]]))
    with pytest.raises(ValueError):
        rump.is_spd(np.ones((2, 3)))
    with pytest.raises(ValueError):
        rump.is_spd(np.array([[1, 1j], [1j, 1]]))           # not Hermitian
    assert not rump.is_spd(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    assert not rump.is_spd(np.array([[np.inf, 0.0], [0.0, 1.0]]))


def test_extreme_scales():
    for s in (1e-300, 1e-310, 1e-20, 1e20, 1e300):
        assert rump.is_spd(s * np.eye(4))
        assert rump.is_spd(s * np.array([[2.0, 1.0], [1.0, 2.0]]))
        assert not rump.is_spd(s * np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_complex_hermitian():
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6))
    H = Z.conj().T @ Z
    H = np.triu(H) + np.triu(H, 1).conj().T
    H[np.diag_indices(6)] = H.diagonal().real
    assert rump.is_spd(H + np.eye(6))
    lam = np.linalg.eigvalsh(H).min()
    assert not rump.is_spd(H - (lam + 1e-3) * np.eye(6))
    E = rump.real_embedding(H)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(E))[::2], np.linalg.eigvalsh(H), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1e-8, 1e-3, 1.0, -1e-3]))
def test_property_sound_and_complete_when_well_conditioned(n, seed, shift):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((rng.integers(1, n + 1), n))
    A = B.T @ B + shift * np.eye(n)
    A = np.triu(A) + np.triu(A, 1).T
    lam = np.linalg.eigvalsh(A)
    if rump.is_spd(A):
        assert lam.min() > 0                                # sound
    if lam.min() > 1e-6 * max(1.0, abs(lam).max()):
        assert rump.is_spd(A)                               # complete away from the boundary


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1),
       st.sampled_from([1.0, 1e-20, 1e20, 1e150]), st.booleans())
def test_prove_norm_leq(m, n, seed, scale, cplx):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((m, n))
    if cplx:
        M = M + 1j * rng.standard_normal((m, n))
    M = M * scale
    s = np.linalg.svd(M, compute_uv=False)[0]
    for method in ("gram", "block"):
        assert rump.prove_norm_leq(M, s * (1 + 1e-9), method=method)
        assert not rump.prove_norm_leq(M, s * (1 - 1e-9), method=method)
        # err: every M' within err of M
        err = 1e-3 * s
        assert rump.prove_norm_leq(M, s * (1 + 1e-9) + err, err=err, method=method)
        assert not rump.prove_norm_leq(M, s * (1 + 1e-9), err=err, method=method)


def test_prove_norm_leq_edge_cases():
    assert rump.prove_norm_leq(np.zeros((3, 2)), 0.0)
    assert rump.prove_norm_leq(np.zeros((3, 2)), 0.0, method="block")
    assert not rump.prove_norm_leq(np.eye(2), 0.0)
    assert not rump.prove_norm_leq(np.eye(2), math.inf)
    assert not rump.prove_norm_leq(np.eye(2), -1.0)
    assert rump.prove_norm_leq(Dense(np.eye(3) * 2.0), 2.0 * (1 + 1e-12))
    assert not rump.prove_norm_leq(Dense(np.eye(3) * 2.0), 2.0)    # not strictly PD at equality
    rank1 = np.outer(np.arange(1.0, 6.0), np.ones(4))
    s = np.linalg.svd(rank1, compute_uv=False)[0]
    assert rump.prove_norm_leq(rank1, s * (1 + 1e-12))
    assert not rump.prove_norm_leq(rank1, s * (1 - 1e-12))
    with pytest.raises(ValueError):
        rump.prove_norm_leq(np.eye(2), 1.0, method="nope")


def test_gramcert_estimate_is_close_and_error_tiny():
    rng = np.random.default_rng(4)
    M = rng.standard_normal((40, 30)) + 1j * rng.standard_normal((40, 30))
    c = rump.GramCert(M)
    s = np.linalg.svd(M, compute_uv=False)[0]
    assert abs(c.estimate() / s - 1) < 1e-12
    assert c.gram_err < 1e-10 * s * s * 2.0 ** (2 * c.k)


def test_l2_upper():
    x = np.array([3.0, 4.0])
    assert rump.l2_upper(x) >= 5.0 and rump.l2_upper(x) < 5.0 * (1 + 1e-14)
    assert rump.l2_upper(np.zeros(5)) == 0.0
    assert rump.l2_upper(np.array([1e-200, 1e-200])) >= math.sqrt(2) * 1e-200
    assert rump.l2_upper(np.array([1e200, 1e200])) == math.inf
