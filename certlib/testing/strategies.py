"""Hypothesis strategies for robustness properties.

``points_in_ball(x, eps)`` draws points of the CLOSED l2 ball of radius eps
around x, boundary included: a direction (a drawn vector, or a signed basis
vector) and a radius fraction in [0, 1] with 0 and 1 drawn explicitly.  Every
returned point p satisfies ||p - x||_2 <= eps in exact arithmetic (checked with
integer arithmetic on the doubles, shrinking by a few ulps when rounding
pushed it out), and points drawn at fraction 1 lie within a relative 1e-9 of
the sphere.  The operator strategies of :mod:`certlib.verifiers.strategies`
are re-exported.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import strategies as st

from certlib.verifiers.strategies import (WEIGHT_KINDS, WEIGHT_SCALES, conv_geometries, conv_operators,  # noqa: F401
                                          dense_operators, weight_arrays)

__all__ = ["points_in_ball", "perturbations", "exact_sq_distance", "dense_operators", "conv_operators",
           "conv_geometries", "weight_arrays", "WEIGHT_SCALES", "WEIGHT_KINDS"]


def exact_sq_distance(p: np.ndarray, x: np.ndarray) -> Fraction:
    """||p - x||_2^2 in exact rational arithmetic (every double is a rational)."""
    a = np.asarray(p, dtype=np.float64).ravel()
    b = np.asarray(x, dtype=np.float64).ravel()
    return sum(((Fraction(float(u)) - Fraction(float(v))) ** 2 for u, v in zip(a, b)), Fraction(0))


def _direction(draw, n: int) -> np.ndarray:
    kind = draw(st.sampled_from(["vector", "vector", "vector", "basis"]))
    if kind == "basis":
        d = np.zeros(n)
        d[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1.0, 1.0]))
        return d
    seed = draw(st.integers(0, 2 ** 32 - 1))
    d = np.random.default_rng(seed).standard_normal(n)
    return d if np.linalg.norm(d) > 0 else np.eye(n)[0]


@st.composite
def points_in_ball(draw, x, eps: float, dtype=None):
    """A point p of the closed l2 ball {p : ||p - x||_2 <= eps}, shaped like x
    (dtype: x's floating dtype, or ``dtype``)."""
    x = np.asarray(x)
    dtype = np.dtype(dtype or (x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64))
    eps = float(eps)
    if not (eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    x = x.astype(dtype)
    frac = draw(st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0)))
    d = _direction(draw, x.size)
    d = d / np.linalg.norm(d)
    r = eps * frac
    limit = Fraction(eps) ** 2
    shrink = 0.0
    while True:
        p = (x.astype(np.float64) + (d * r * (1.0 - shrink)).reshape(x.shape)).astype(dtype)
        if exact_sq_distance(p, x) <= limit:
            return p
        shrink = max(4 * float(np.finfo(dtype).eps), 2 * shrink)   # rounding pushed p outside: pull it in


def perturbations(shape, eps: float, dtype=np.float64):
    """Perturbations delta with ||delta||_2 <= eps (boundary included), of the given shape."""
    return points_in_ball(np.zeros(shape, dtype=dtype), eps)
