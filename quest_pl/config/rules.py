"""Which keys need which others: one table of "key X acts only when Y" rules, checked on every composed config.

A key set to a value that changes something (``is_set``) in a config where nothing reads it (``needs`` false) would be
accepted and do nothing: a run trained "with" ``quant.backward=sr`` but no grid is plain BF16. Each row of
:data:`RULES` names such a key, the condition under which it acts, and what to do instead; :func:`violation` returns
the one-line error of the first row that fires, which :func:`quest_pl.config.validate` raises. Keys at their defaults
never fire, so every shipped config passes (tested). Value checks (types, ranges) stay with the key's group in
its module of :mod:`quest_pl.config`. This module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _quantized(cfg: DictConfig) -> bool:
    return _get(cfg, "quant.grid") is not None


def _estimator(*names: str) -> Callable[[DictConfig], bool]:
    """Some quantized operand uses one of these estimators (``quant.estimator`` or a per-operand override)."""

    def uses(cfg: DictConfig) -> bool:
        if not _quantized(cfg):
            return False
        default = _get(cfg, "quant.estimator")
        ops = [(_get(cfg, f"quant.{op}_bits"), _get(cfg, f"quant.{op}_estimator") or default) for op in ("w", "a")]
        return any(bits is not None and est in names for bits, est in ops)

    return uses


def _equals(key: str, *values: Any) -> Callable[[DictConfig], bool]:
    return lambda cfg: _get(cfg, key) in values


def _set(key: str) -> Callable[[DictConfig], bool]:
    return lambda cfg: _get(cfg, key) not in (None, "", False)


def _differs(default: Any) -> Callable[[Any], bool]:
    return lambda v: v != default


def _not_null(v: Any) -> bool:
    return v is not None


@dataclass(frozen=True)
class Rule:
    """``key`` set to a value for which ``is_set`` holds acts only when ``needs(cfg)``; otherwise the error is
    ``KEY=VALUE: MESSAGE``. ``per_arm``: a quantization key, which in a sweep moves the quantized arms and leaves the
    BF16 baseline arm as it is (checked for single runs only)."""

    key: str
    is_set: Callable[[Any], bool]
    needs: Callable[[DictConfig], bool]
    message: str
    per_arm: bool = False


_GRID = "needs a quantizer grid, and quant.grid is null (nothing is quantized); choose one (e.g. quant=quest_w4a4)"
_PROBE = "acts only with probe.from=CHECKPOINT"
_COMPRESSED = "acts only with a compressed gradient hook: set grad_comm.hook=quantized or correlated"

RULES: tuple[Rule, ...] = (
    # quantization keys without a grid: the run would be plain BF16
    *(
        Rule(f"quant.{k}", _not_null, _quantized, _GRID, per_arm=True)
        for k in ("bits", "w_bits", "a_bits", "w_grid", "a_grid", "group_size", "scale_rule")
    ),
    Rule("quant.backward", _differs("none"), _quantized, _GRID, per_arm=True),
    Rule("quant.hadamard", _differs(False), _quantized, _GRID, per_arm=True),
    *(
        Rule(
            f"quant.{k}",
            _differs(d),
            lambda cfg: _get(cfg, "quant.backward") not in (None, "none"),
            "acts only with a quantized backward: set quant.backward=sr, rtn or rtn_rht",
            per_arm=True,
        )
        for k, d in (("backward_format", "nvfp4"), ("backward_operands", "grad"))
    ),
    Rule(
        "quant.hadamard_mode",
        _differs("half"),
        _set("quant.hadamard"),
        "acts only with quant.hadamard=true",
        per_arm=True,
    ),
    # estimator options without their estimator
    Rule("quant.trust", _not_null, _estimator("trust"), "acts only with the trust estimator", per_arm=True),
    Rule("quant.clip_scale", _differs(1.0), _estimator("clip"), "acts only with the clip estimator", per_arm=True),
    Rule("quant.lsq_per_row", _differs(False), _estimator("lsq"), "acts only with the lsq estimator", per_arm=True),
    Rule("quant.pact_grad_scale", _differs(True), _estimator("pact"), "acts only with the pact estimator", True),
    Rule(
        "quant.learned_init_steps",
        lambda v: v != 0,
        _estimator("lsq", "pact"),
        "re-initialises learned scales, and no operand has one; use a learned-scale config (e.g. quant=lsq_w4a4)",
        per_arm=True,
    ),
    # gradient communication: a DDP hook without DDP, options without a compressed hook
    Rule(
        "grad_comm.hook",
        _differs("none"),
        _equals("trainer.strategy", "ddp", "ddp_spawn"),
        "a DDP communication hook; needs trainer.strategy=ddp or ddp_spawn",
    ),
    *(
        Rule(f"grad_comm.{k}", _differs(d), _equals("grad_comm.hook", "quantized", "correlated"), _COMPRESSED)
        for k, d in (("bits", 4), ("chunk", 1024), ("marina_p", 1.0))
    ),
    # after-training tools' options without the tool
    Rule("eval.text_file", _not_null, _set("eval.from"), "acts only with eval.from=CHECKPOINT"),
    Rule("eval.allow_quant_change", _differs(False), _set("eval.from"), "acts only with eval.from=CHECKPOINT"),
    Rule("eval.batch_size", _differs(16), _set("eval.text_file"), "acts only with eval.text_file=FILE"),
    Rule("ptq.act_grid", _not_null, _set("ptq.act_bits"), "acts only with ptq.act_bits set (quantized activations)"),
    Rule("ptq.calib_batches", _differs(16), _equals("ptq.method", "aqlm"), "acts only with ptq.method=aqlm"),
    Rule("probe.quant", _differs(["ste_w4a4", "trust_w4a4", "quest_w4a4"]), _set("probe.from"), _PROBE),
    Rule("probe.batches", _differs(4), _set("probe.from"), _PROBE),
    Rule("probe.device", _differs("auto"), _set("probe.from"), _PROBE),
)


def violation(cfg: DictConfig, sweep: bool = False) -> str | None:
    """The error line of the first row of :data:`RULES` that fires on ``cfg``, or None. ``sweep``: skip the per-arm
    quantization rows (one job of a multirun, where a ``quant.*`` override applies to the quantized arms only)."""
    for rule in RULES:
        if sweep and rule.per_arm:
            continue
        value = _get(cfg, rule.key)
        if value is None and rule.is_set is not _not_null:
            continue  # the key is absent (an older or partial config): nothing set
        if rule.is_set(value) and not rule.needs(cfg):
            return f"{rule.key}={value!r}: {rule.message}"
    return None
