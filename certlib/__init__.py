"""certlib: deterministic, sound l2 robustness certification (LiResNet / GloRo).

Certification is the product: every Lipschitz number the certifier accepts is a
:class:`certlib.bounds.Bound` (a proven upper bound), never an
:class:`certlib.bounds.Estimate`.
"""

from certlib._version import __version__  # noqa: F401
