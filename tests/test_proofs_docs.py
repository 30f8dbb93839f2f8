"""The written proofs (proofs/*.md): every proof cites tests that exist, every
proof the code refers to exists, and the rules that no other test exercises
(MaxPool overlap, the affine rule and the fold margin) are checked numerically."""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROOFS = ROOT / "proofs"
CITE = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")


def _functions(path: Path) -> set:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("md", sorted(p.name for p in PROOFS.glob("*.md") if p.name != "index.md"))
def test_every_proof_cites_existing_tests(md):
    text = (PROOFS / md).read_text()
    cites = CITE.findall(text)
    assert "**Tests.**" in text and cites, f"{md} names no test"
    for file, name in cites:
        assert (ROOT / file).is_file(), f"{md} cites missing file {file}"
        assert name in _functions(ROOT / file), f"{md} cites missing test {file}::{name}"


def test_every_referenced_proof_exists_and_is_indexed():
    index = (PROOFS / "index.md").read_text()
    for md in PROOFS.glob("*.md"):
        assert md.name == "index.md" or f"]({md.name})" in index, f"{md.name} missing from proofs/index.md"
    sources = [p for d in ("certlib", "verifiers", "models", "proofs") for p in (ROOT / d).rglob("*.py")]
    sources += list(PROOFS.glob("*.md"))
    for src in sources:
        for name in re.findall(r"proofs/(\w+)\.md", src.read_text()):
            assert (PROOFS / f"{name}.md").is_file(), f"{src.relative_to(ROOT)} refers to missing proofs/{name}.md"
        for name in re.findall(r"\]\((\w+)\.md\)", src.read_text()):
            assert (PROOFS / f"{name}.md").is_file(), f"{src.name} links to missing {name}.md"


def _maxpool_1d(x: np.ndarray, k: int, s: int) -> np.ndarray:
    n = x.shape[-1]
    return np.stack([x[..., i:i + k].max(axis=-1) for i in range(0, n - k + 1, s)], axis=-1)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 3), (2, 1), (3, 1), (3, 2), (5, 2)])
def test_maxpool_overlap_rule(k, s):
    """proofs/maxpool.md: 2-D MaxPool (k x k, stride s) is sqrt(c)-Lipschitz, c = ceil(k/s)^2."""
    rng = np.random.default_rng(k * 10 + s)
    c = math.ceil(k / s) ** 2

    def pool(x):  # separable: max over rows of windows, then over columns
        return np.swapaxes(_maxpool_1d(np.swapaxes(_maxpool_1d(x, k, s), -1, -2), k, s), -1, -2)

    x = rng.standard_normal((4000, 12, 12))
    d = rng.standard_normal((4000, 12, 12)) * rng.choice([1e-3, 1.0, 10.0], (4000, 1, 1))
    ratio = (np.linalg.norm((pool(x + d) - pool(x)).reshape(4000, -1), axis=1)
             / np.linalg.norm(d.reshape(4000, -1), axis=1))
    assert ratio.max() <= math.sqrt(c) * (1 + 1e-12)
    spike = np.zeros((12, 12))
    spike[6, 6] = 1.0  # an input shared by the most windows: the constant is attained
    assert np.linalg.norm(pool(spike[None])) == pytest.approx(math.sqrt(c), rel=1e-15)


def test_chained_fold_margin():
    """proofs/margin_slack.md, "Folds": fl(fl(W s1) s2) against the exact W s1 s2
    (Fractions), with s1 a stored Div scale off by u: the composed relative
    error and the fold margin cover it; min|s1 s2| is bounded below."""
    from certlib.ir.fold import _fold_rel, _fold_rounding_margin, _smin_down
    from certlib.ir.graph import AffineNode
    from certlib.verifiers.operators import Dense

    rng = np.random.default_rng(3)
    for _ in range(20):
        W = rng.standard_normal((3, 4))
        k = rng.uniform(1, 9, 3)                       # Div by k: stored fl(1/k), exact 1/k
        s2 = rng.uniform(-2, 2, 3) * 2.0 ** rng.integers(-40, 40)
        a1 = AffineNode("d", "Div", (3,), (3,), scale=1.0 / k, shift=np.zeros(3), const_err=2.0 ** -53)
        a2 = AffineNode("m", "Mul", (3,), (3,), scale=s2, shift=np.zeros(3))
        Wf = (W * (1.0 / k)[:, None]) * s2[:, None]
        exact = [[Fraction(float(W[i, j])) / Fraction(float(k[i])) * Fraction(float(s2[i])) for j in range(4)]
                 for i in range(3)]
        rel = _fold_rel(_fold_rel(0.0, a1), a2)
        for i in range(3):
            for j in range(4):
                assert abs(Fraction(float(Wf[i, j])) - exact[i][j]) <= Fraction(rel) * abs(exact[i][j])
        E = np.array([[float(Fraction(float(Wf[i, j])) - exact[i][j]) for j in range(4)] for i in range(3)])
        assert np.linalg.norm(E, 2) <= _fold_rounding_margin(Dense(Wf), rel)
        smin = _smin_down(_smin_down(1.0, a1, a1.scale), a2, s2)
        assert Fraction(smin) <= min(abs(Fraction(1) / Fraction(float(k[i])) * Fraction(float(s2[i])))
                                     for i in range(3))


def test_affine_rule_and_fold_margin():
    """proofs/normalisation.md: ||diag(s)|| = max|s|, and the fold margin covers fl(s K) - s K."""
    from certlib.ir.fold import _fold_rounding_margin
    from certlib.ir.graph import compose_rel
    from certlib.verifiers.operators import Conv2d

    rng = np.random.default_rng(0)
    s = rng.uniform(-3, 3, 6)
    assert np.linalg.svd(np.diag(s), compute_uv=False)[0] == pytest.approx(np.max(np.abs(s)), rel=1e-15)
    K = rng.standard_normal((3, 2, 3, 3))
    sc = rng.uniform(0.1, 3, 3) / 7  # not exact products
    Kf = K * sc[:, None, None, None]
    E = np.array([float(Fraction(float(a)) - Fraction(float(b)) * Fraction(float(c)))
                  for a, b, c in zip(Kf.ravel(), K.ravel(), np.repeat(sc, K[0].size))]).reshape(K.shape)
    assert np.any(E != 0)
    op_e = Conv2d(E, (2, 5, 5), padding=1)
    norm_e = np.linalg.svd(op_e.to_dense(), compute_uv=False)[0]
    lemma = math.sqrt(9) * np.linalg.norm(E)  # ||conv_E|| <= sqrt(T) ||E||_F
    assert norm_e <= lemma * (1 + 1e-12)
    assert lemma <= _fold_rounding_margin(Conv2d(Kf, (2, 5, 5), padding=1), compose_rel(0.0, 2.0 ** -53))
    for _ in range(20):  # the sqrt(T) lemma on random kernels and geometries
        E = rng.standard_normal((2, 2, 3, 2))
        op = Conv2d(E, (2, 5, 4), padding=(1, 0, 2, 1), stride=(1, 2))
        assert np.linalg.svd(op.to_dense(), compute_uv=False)[0] <= math.sqrt(6) * np.linalg.norm(E) * (1 + 1e-12)
