"""`trust`: gradient passes where |q(x) - x| <= tau * sigma (METHOD.md §1.4 TrustQuantizer, §1.5, §1.6).

tau = `trust` (sigma units), default `quantizer.default_trust`:
* gaussian_mse / int_sparse24: alpha_b / (n - 1), half a step, so the mask is |x| <= s + step/2 = alpha_b n/(n-1) sigma;
* uniform (absmax): half a step per row, s / (n - 1) (nothing is ever masked);
* lloyd_max: half the outermost gap (l_max - l_{max-1}) / 2;
* fp4: (6 - 4) a / 2 = a = 0.48708 (not the reference's 0.3186, §7.5); ternary: s / 2.
sigma has no eps; all-zero rows pass (see `Grid.trust_threshold`).
"""

from __future__ import annotations

from torch import Tensor

from quest_pl.estimators.base import Estimator, register_estimator
from quest_pl.quantizers import Grid, QuantOutput


@register_estimator("trust")
class Trust(Estimator):
    def __init__(self, quantizer: Grid, trust: float | None = None) -> None:
        super().__init__(quantizer)
        self.trust = trust

    def extra_repr(self) -> str:
        return f"trust={self.trust}"

    def pass_mask(self, x32: Tensor, out: QuantOutput) -> Tensor:
        return (out.values - x32).abs() <= self.quantizer.trust_threshold(out, self.trust)

    def expected_masked_fraction(self) -> float | None:
        """P(|q(z) - z| > tau) on N(0,1). Absmax grids: 0 with the default half-step rule, else None."""
        tau = self.quantizer.default_trust if self.trust is None else self.trust
        if self.quantizer.levels is None:
            return 0.0 if self.trust is None and self.quantizer.absmax_covers_row else None
        jumps = [level + sign * tau for level in self.quantizer.levels.tolist() for sign in (-1, 1)]
        return self.quantizer.gaussian_expectation(lambda z, q: (q - z).abs() > tau, [*jumps, -tau, tau])
