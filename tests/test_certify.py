"""GloRo decision rule: strict inequality, ties/NaN/Inf never certify,
radius consistency, estimates refused."""

import math

import numpy as np
import pytest

from certlib.bounds import Bound, Estimate, UnsoundError
from certlib.certify import certify, parse_eps
from certlib.ir.compose import pair_constants

B1 = Bound(1.0, "test", "exact")


def _K(C=3, k=1.0):
    K = np.full((C, C), k)
    np.fill_diagonal(K, 0)
    return K


def test_margin_exactly_at_threshold_is_not_certified():
    # f_y - f_j = 1, eps * K = 1 -> not certified (strict), slack 0
    f = np.array([[1.0, 0.0, 0.0]])
    r = certify(f, np.zeros(1), np.array([0]), _K(), B1, 1.0)
    assert not r.certified[0]
    r = certify(f, np.zeros(1), np.array([0]), _K(), B1, 0.999)
    assert r.certified[0]


def test_ties_nan_inf_never_certify():
    f = np.array([[1.0, 1.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [0.0, -np.inf, 1.0]])
    r = certify(f, np.zeros(4), np.array([0, 0, 0, 2]), _K(k=1e-9), B1, 0.0)
    assert not r.certified.any()
    assert (r.radius == 0).all()


def test_nan_error_bound_never_certifies():
    f = np.array([[5.0, 0.0, 0.0]])
    r = certify(f, np.array([np.nan]), np.array([0]), _K(), B1, 0.1)
    assert not r.certified[0]


def test_slack_is_subtracted():
    f = np.array([[1.0, 0.0, 0.0]])
    # err 0.1 -> slack sqrt(2)*0.1 ~ 0.1414: margin left 0.8586
    r = certify(f, np.array([0.1]), np.array([0]), _K(), B1, 0.85)
    assert r.certified[0]
    r = certify(f, np.array([0.1]), np.array([0]), _K(), B1, 0.86)
    assert not r.certified[0]


def test_radius_is_consistent_with_decision():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 5)) * 3
    K = pair_constants(rng.normal(size=(5, 7)), 2.0)
    y = rng.integers(0, 5, 200)
    base = certify(f, np.zeros(200), y, K, B1, 0.0)
    for eps in [0.01, 0.1, 0.5, 1.0]:
        r = certify(f, np.zeros(200), y, K, B1, eps)
        # certified at eps implies radius > eps (radius is a lower-rounded min)
        assert np.all(base.radius[r.certified] >= eps * (1 - 1e-12))
        # radius comfortably above eps implies certified
        assert np.all(r.certified[base.radius > eps * (1 + 1e-9)])


def test_certify_refuses_estimates():
    f = np.array([[1.0, 0.0, 0.0]])
    with pytest.raises(UnsoundError):
        certify(f, np.zeros(1), np.array([0]), _K(), Estimate(1.0, "power"), 0.1)
    with pytest.raises(UnsoundError):
        Bound(Estimate(1.0, "power"), "x")
    with pytest.raises(UnsoundError):
        Bound(float("nan"), "x")


def test_pair_constants_upper_bound_exact_norms():
    rng = np.random.default_rng(1)
    for scale in [1e-20, 1.0, 1e20]:
        W = rng.normal(size=(6, 33)) * scale
        K = pair_constants(W, 1.5)
        for i in range(6):
            for j in range(6):
                exact = 1.5 * math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(W[i], W[j])))
                assert K[i, j] >= exact
                if i != j:
                    assert K[i, j] <= exact * (1 + 1e-12)


def test_parse_eps_rounds_up():
    from fractions import Fraction

    for text in ["36/255", "0.1", "1/3", "0.3"]:
        v = parse_eps(text)
        assert Fraction(v) >= Fraction(text)
        assert v == pytest.approx(float(Fraction(text)), rel=1e-15)
    for bad in ["-1", "abc", "1/0", "nan"]:
        with pytest.raises(ValueError):
            parse_eps(bad)
