"""Independent Lipschitz (operator-norm) verifiers.

They share only the operator definitions in :mod:`certlib.verifiers.operators`,
so that a bug in one verifier is caught by the others.
"""
