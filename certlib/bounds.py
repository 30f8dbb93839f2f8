"""Soundness in the types: proven upper bounds versus unproven estimates.

An :class:`Estimate` is a number that nothing has proven (a power-iteration
value, a solver objective).  A :class:`Bound` is an upper bound that holds in
exact arithmetic and already includes the floating-point error of the
computation that produced it.  The certifier accepts only Bounds.

Arithmetic on bounds rounds upward: every product or sum of two finite,
non-negative doubles is computed in round-to-nearest and then moved one ulp up
(``math.nextafter``), which is >= the exact real result (the rounding error of
one IEEE operation is below one ulp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Estimate", "Bound", "up", "up_mul", "up_add", "up_sqrt", "UnsoundError"]


class UnsoundError(TypeError):
    """Raised when an Estimate is handed to code that needs a Bound."""


def up(x: float) -> float:
    """The next double above x (x must be finite)."""
    return math.nextafter(float(x), math.inf)


def up_mul(a: float, b: float) -> float:
    """An upper bound on the exact product a*b of non-negative doubles (always
    one step up: the certificate's composition rule, which the independent
    checker recomputes, is nextafter(L * b, +inf))."""
    return up(float(a) * float(b))


def up_add(a: float, b: float) -> float:
    """An upper bound on the exact sum a+b of non-negative doubles."""
    return up(float(a) + float(b))


def up_sqrt(a: float) -> float:
    """An upper bound on sqrt(a) (IEEE sqrt is correctly rounded)."""
    return up(math.sqrt(float(a)))


@dataclass(frozen=True)
class Estimate:
    """A value that is NOT proven to bound anything (e.g. power iteration).

    Power iteration returns ||W v|| for a unit v, which is a lower bound on the
    spectral norm; it may only be used to propose a candidate for a proof.
    """

    value: float
    method: str
    info: dict = field(default_factory=dict, compare=False)

    def __float__(self) -> float:  # pragma: no cover - convenience
        return float(self.value)


@dataclass(frozen=True)
class Bound:
    """A proven upper bound, valid in exact arithmetic.

    ``rigor`` says what the proof rests on (e.g. "svd+backward-error",
    "rump-cholesky"). ``value`` is finite and >= 0.
    """

    value: float
    method: str
    rigor: str = ""
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        v = float(self.value)
        if isinstance(self.value, Estimate) or not math.isfinite(v) or v < 0:
            raise UnsoundError(f"a Bound must be a finite non-negative number, got {self.value!r}")

    def __mul__(self, other: "Bound") -> "Bound":
        if not isinstance(other, Bound):
            raise UnsoundError(f"cannot multiply a Bound by {type(other).__name__}")
        return Bound(up_mul(self.value, other.value), "product", "upward-rounded product")

    @staticmethod
    def one(method: str = "identity") -> "Bound":
        return Bound(1.0, method, "exact")


def require_bound(x: object, what: str = "value") -> Bound:
    """Return x if it is a Bound, else raise UnsoundError (never accept estimates)."""
    if not isinstance(x, Bound):
        raise UnsoundError(f"{what} must be a proven Bound, got {type(x).__name__}: {x!r}")
    return x
