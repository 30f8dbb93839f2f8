"""An example property suite to copy: certify a freshly trained PyTorch model
inside pytest, and check with Hypothesis that certified samples really keep
their prediction on the whole l2 ball (boundary included).

Run:  pytest examples/           (add --certlib-report=PATH to choose where the
                                  certlib_report fixture writes its JSON)
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import certlib
from certlib.testing import assert_certified, assert_lipschitz_at_most, points_in_ball

EPS = 0.1


def test_sound_vra_is_high_enough(digits_model, certlib_report):
    _, model = digits_model
    report = certlib.verify(model, "digits", EPS)
    assert report.sound
    assert report.vra >= 0.75, report          # measured 85.00% (seed 0)
    assert len(certlib_report) == 1            # recorded into the run's certlib JSON report


def test_lipschitz_is_bounded(digits_model):
    _, model = digits_model
    bound = assert_lipschitz_at_most(model, 100.0)
    assert bound.value >= bound.body.value     # whole network = body x head


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_certified_points_keep_their_prediction(digits_model, digits_test, data):
    module, model = digits_model
    i = data.draw(st.integers(0, 49))
    x, y = digits_test.x[i], int(digits_test.y[i])
    try:
        assert_certified(model, x, y, EPS)
    except AssertionError:
        return                                  # only certified samples make a promise
    p = data.draw(points_in_ball(x, EPS))
    with torch.no_grad():
        assert int(module(torch.tensor(p[None])).argmax()) == y


def test_every_sample_of_a_class_batch(digits_model, digits_test):
    _, model = digits_model
    report = certlib.verify(model, digits_test, EPS, limit=40)
    ok = report.certified & report.correct
    assert_certified(model, digits_test.x[:40][ok], digits_test.y[:40][ok], EPS)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="eps=2.0 is far beyond this model's certified radii: shows the failure message")
def test_certified_at_a_large_radius(digits_model, digits_test):
    _, model = digits_model
    assert_certified(model, digits_test.x[0], int(digits_test.y[0]), 2.0)


def test_the_failure_message_says_why(digits_model, digits_test):
    _, model = digits_model
    with pytest.raises(AssertionError) as info:
        assert_certified(model, digits_test.x[0], int(digits_test.y[0]), 2.0)
    msg = str(info.value)
    assert "not certified at eps=2" in msg
    assert "margin to class" in msg and "needed >" in msg and "certified radius" in msg
    d = info.value.details[0]
    assert d["margin"] <= d["needed"] and 0 <= d["radius"] < 2.0
    np.testing.assert_allclose(d["needed"], 2.0 * d["needed"] / d["eps"])
