"""Run names and the config's resolvers: ``${arm_name:${quant},${ptq},${probe},${eval},<debug option>}`` names a run by
what it trains (the bits: ``quest_w4a4`` becomes ``quest_w3a3`` under ``quant.bits=3``) or evaluates (``eval_<arm>``,
``ptq_...``, ``probe_<arm>``); ``${seed_list:${seeds}}`` turns an experiment's seeds into the sweeper's choice
list."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from quest_pl.config.ptq import PTQConfig

ARM_RESOLVER = "arm_name"
SEEDS_RESOLVER = "seed_list"
_BITS_SUFFIX = re.compile(r"_w[0-9.]+a[0-9.]+$")


def _bits(b) -> str:
    return "16" if b is None else f"{float(b):g}"


def quant_arm_name(name: str, grid: str | None, w_bits=None, a_bits=None) -> str:
    """``<quant.name without its _wXaY suffix>_w<w_bits>a<a_bits>`` (16 for a full-precision operand); the bare
    name when nothing is quantized (``bf16``)."""
    if grid is None or (w_bits is None and a_bits is None):
        return name
    return f"{_BITS_SUFFIX.sub('', name)}_w{_bits(w_bits)}a{_bits(a_bits)}"


def _checkpoint_arm(path: str) -> str:
    """The arm a checkpoint was trained as: from its run's ``.hydra/config.yaml`` (``<run>/checkpoints/x.ckpt``),
    else from the config stored in the checkpoint; ``checkpoint`` when neither says."""
    ckpt = Path(str(path)).expanduser()
    saved = ckpt.parent.parent / ".hydra" / "config.yaml"
    quant = None
    try:
        if saved.is_file():
            quant = OmegaConf.to_container(OmegaConf.load(saved).get("quant"), resolve=True)
        elif ckpt.is_file():
            import torch

            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            quant = (state.get("quest_pl_config") or {}).get("quant")
    except Exception:  # an unreadable file: the run itself reports it in one line
        quant = None
    if not isinstance(quant, dict):
        return "checkpoint"
    return quant_arm_name(quant.get("name", "quant"), quant.get("grid"), quant.get("w_bits"), quant.get("a_bits"))


def arm_name(
    quant: DictConfig,
    ptq: DictConfig | None = None,
    probe: DictConfig | None = None,
    evaluate: DictConfig | None = None,
    debug: str | None = None,
) -> str:
    """``run_name`` of a run, naming what it trains or evaluates: the quant arm (:func:`quant_arm_name`); the PTQ
    setting (``ptq_<grid>_w<b>a<b>``, :class:`quest_pl.config.ptq.PTQConfig`) for ``ptq.from=CKPT``; ``probe_<arm>`` and
    ``eval_<arm>`` (the checkpoint's arm) for ``probe.from`` / ``eval.from``; ``debug_<option>_<arm>`` under
    ``debug=<option>``."""
    if probe is not None and probe.get("from"):
        return f"probe_{_checkpoint_arm(probe.get('from'))}"
    if ptq is not None and ptq.get("from"):
        return PTQConfig.name_of(ptq)  # not validated here: ptq.run reports bad values
    if evaluate is not None and evaluate.get("from"):
        return f"eval_{_checkpoint_arm(evaluate.get('from'))}"
    arm = quant_arm_name(quant.get("name", "quant"), quant.get("grid"), quant.get("w_bits"), quant.get("a_bits"))
    return f"debug_{debug}_{arm}" if debug else arm


def seed_list(seeds) -> str:
    """``seeds`` (a list of integers, or one integer) as the sweeper's ``0,1,2`` choice list (``${seed_list:${seeds}}``
    in the experiment files); anything else is a one-line error."""
    values = list(seeds) if isinstance(seeds, (list, tuple, ListConfig)) else [seeds]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"seeds={seeds!r}: expected a non-empty list of integers, e.g. seeds=[0,1,2]")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds={list(values)!r}: expected distinct seeds")
    return ",".join(str(v) for v in values)


def register_resolvers() -> None:
    """``${arm_name:...}`` for ``run_name`` in ``experiments/config.yaml`` and
    ``${seed_list:${seeds}}`` for the experiments' sweeps. Idempotent; called by ``run.py`` before Hydra composes,
    and by anything that resolves a saved config."""
    if not OmegaConf.has_resolver(ARM_RESOLVER):
        OmegaConf.register_new_resolver(ARM_RESOLVER, arm_name)
    if not OmegaConf.has_resolver(SEEDS_RESOLVER):
        OmegaConf.register_new_resolver(SEEDS_RESOLVER, seed_list)
