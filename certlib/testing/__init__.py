"""certlib for users' property-based test suites (docs/api.md).

* Hypothesis strategies: :func:`points_in_ball` (the closed l2 ball, boundary
  included), :func:`perturbations`, and certlib's operator strategies
  (:func:`dense_operators`, :func:`conv_operators`, ...);
* assertions: :func:`assert_certified`, :func:`assert_lipschitz_at_most`;
* a pytest plugin (:mod:`certlib.testing.plugin`, registered as ``certlib``)
  whose ``certlib_report`` fixture collects what a run certified into one JSON file.

Importing this module needs hypothesis (``pip install certlib[test]``).
"""

from certlib.testing.assertions import assert_certified, assert_lipschitz_at_most
from certlib.testing.strategies import (WEIGHT_KINDS, WEIGHT_SCALES, conv_geometries, conv_operators,
                                        dense_operators, perturbations, points_in_ball, weight_arrays)

__all__ = ["points_in_ball", "perturbations", "assert_certified", "assert_lipschitz_at_most",
           "dense_operators", "conv_operators", "conv_geometries", "weight_arrays", "WEIGHT_SCALES", "WEIGHT_KINDS"]
