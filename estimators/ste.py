"""`ste`: straight-through estimator, identity gradient everywhere, clipped elements included (METHOD.md §1.4)."""

from __future__ import annotations

from quest_pl.estimators.base import Estimator, register_estimator


@register_estimator("ste")
class STE(Estimator):
    def pass_mask(self, x32, out):
        return None

    def expected_masked_fraction(self) -> float:
        return 0.0
