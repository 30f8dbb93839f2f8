"""certlib.testing: the l2-ball strategies (exact Fraction oracle), the
assertions' messages and the pytest plugin's JSON report."""

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import onnx
import pytest
from hypothesis import find, given, settings, strategies as st

import certlib
from api_models import trained_mlp
from certlib.api_torch import export_module
from certlib.data import load
from certlib.testing import assert_certified, assert_lipschitz_at_most, perturbations, points_in_ball
from certlib.testing.strategies import exact_sq_distance

CENTRES = [np.zeros(3), np.array([0.5, -2.0, 1e-3, 7.0]), np.full((1, 4, 4), 0.3, dtype=np.float32),
           np.array([1e8, -1e-8])]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), k=st.integers(0, len(CENTRES) - 1), eps=st.sampled_from([0.0, 1e-9, 0.1, 1 / 3, 2.5, 1e6]))
def test_points_lie_in_the_closed_ball_exactly(data, k, eps):
    x = CENTRES[k]
    p = data.draw(points_in_ball(x, eps))
    assert p.shape == x.shape and p.dtype == x.dtype
    assert exact_sq_distance(p, x) <= Fraction(eps) ** 2      # exact rational arithmetic, no tolerance


@pytest.mark.parametrize("k", range(len(CENTRES)))
def test_the_boundary_is_drawn(k):
    x, eps = CENTRES[k], 0.1
    p = find(points_in_ball(x, eps), lambda p: exact_sq_distance(p, x) >= Fraction(eps * (1 - 1e-6)) ** 2,
             settings=settings(max_examples=50, database=None))
    assert exact_sq_distance(p, x) <= Fraction(eps) ** 2
    # and the centre itself (radius fraction 0)
    find(points_in_ball(x, eps), lambda p: np.array_equal(p, x), settings=settings(max_examples=50, database=None))


def test_directions_cover_the_sphere():
    pts = [find(perturbations((2,), 1.0), lambda d, s=s: float(np.dot(d, s)) > 0.9,
                settings=settings(max_examples=500, database=None))
           for s in (np.array([1.0, 0]), np.array([-1.0, 0]), np.array([0, 1.0]), np.array([0, -1.0]))]
    assert len(pts) == 4


def test_assert_certified_passes_and_fails_with_the_numbers():
    model = certlib.load_model(trained_mlp(), (1, 8, 8))
    ds = load("digits").take(40)
    rep = certlib.verify(model, ds, 0.05)
    good = np.flatnonzero(rep.certified & rep.correct)
    assert good.size
    assert_certified(model, ds.x[good[0]], int(ds.y[good[0]]), 0.05)
    with pytest.raises(AssertionError) as info:
        assert_certified(model, ds.x[:5], ds.y[:5], 5.0)
    msg = str(info.value)
    assert "5 of 5 sample(s) not certified at eps=5" in msg and "needed >" in msg and "certified radius" in msg
    for d in info.value.details:
        assert d["margin"] <= d["needed"]                          # the reason it failed
        assert d["radius"] == rep.radius[d["index"]]                # the radius does not depend on eps
    bad = np.flatnonzero(~rep.correct)
    if bad.size:
        with pytest.raises(AssertionError, match="misclassified"):
            assert_certified(model, ds.x[bad[0]], int(ds.y[bad[0]]), 0.0)


def test_assert_lipschitz_at_most():
    model = certlib.load_model(trained_mlp(), (1, 8, 8))
    b = assert_lipschitz_at_most(model, 1e6)
    assert_lipschitz_at_most(model, b.value)
    with pytest.raises(AssertionError, match="proven Lipschitz bound .* > .*loosest stages"):
        assert_lipschitz_at_most(model, b.value * 0.999)


def test_pytest_plugin_writes_the_run_report(tmp_path):
    onnx.save(export_module(trained_mlp(), (1, 8, 8)), str(tmp_path / "m.onnx"))
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import certlib

        def test_cert(certlib_report):
            certlib.verify("m.onnx", "digits", 0.1, limit=12)
            assert len(certlib_report) == 1

        def test_not_recorded():
            certlib.verify("m.onnx", "digits", 0.1, limit=5)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",  # the entry point loads the plugin
                          "--certlib-report=run.json", "test_user.py"], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    j = json.loads((tmp_path / "run.json").read_text())
    assert [e["test"] for e in j["entries"]] == ["test_user.py::test_cert"]
    e = j["entries"][0]
    assert e["n"] == 12 and e["sound"] is True and 0 <= e["vra"] <= e["clean_accuracy"] <= 1
    assert "1 verification(s) recorded" in out.stdout
