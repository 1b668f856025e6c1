"""Gradient estimators over `quantizers` grids (METHOD.md §1.4, §1.9): ste, clip, trust, lsq, pact, none.

`build(name, quantizer=q, **kw)` returns a module `e`: `e(x)` has q's values forward (x's dtype) and the estimator's
gradient backward. `e.record_mask = True` stores `e.last_mask` (True where the gradient passes);
`e.expected_masked_fraction()` gives the N(0,1) reference for it.
"""

from quest_pl.estimators import backward, clip, identity, lsq, pact, ste, trust
from quest_pl.estimators.base import ESTIMATORS, Estimator, MaskedStraightThrough, build, register_estimator

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "MaskedStraightThrough",
    "backward",
    "build",
    "clip",
    "identity",
    "lsq",
    "pact",
    "register_estimator",
    "ste",
    "trust",
]
