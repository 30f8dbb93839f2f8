"""Composition helpers: the exact explicit conv matrix, folding."""

import numpy as np
from hypothesis import given, settings

from certlib.lipschitz import conv_matrix
from certlib.verifiers.strategies import conv_operators


@settings(max_examples=150, deadline=None)
@given(conv_operators())
def test_conv_matrix_is_the_operator(op):
    np.testing.assert_array_equal(conv_matrix(op), op.to_dense())
