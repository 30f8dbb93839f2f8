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


def test_affine_rule_and_fold_margin():
    """proofs/normalisation.md: ||diag(s)|| = max|s|, and the fold margin covers fl(s K) - s K."""
    from certlib.ir.compose import _fold_rounding_margin
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
    assert lemma <= _fold_rounding_margin(Conv2d(Kf, (2, 5, 5), padding=1))
    for _ in range(20):  # the sqrt(T) lemma on random kernels and geometries
        E = rng.standard_normal((2, 2, 3, 2))
        op = Conv2d(E, (2, 5, 4), padding=(1, 0, 2, 1), stride=(1, 2))
        assert np.linalg.svd(op.to_dense(), compute_uv=False)[0] <= math.sqrt(6) * np.linalg.norm(E) * (1 + 1e-12)
