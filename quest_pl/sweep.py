"""Sweeps: readable arm names for job directories and the report written when a Hydra multirun ends.

An experiment file (``experiments/experiment/*.yaml``) sweeps over the ``quant`` group and the ``seeds`` list; each
job's directory is ``<num>_<arm>_s<seed>``, where the arm name states the bits actually trained (``quest_w4a4`` becomes
``quest_w3a3`` under ``quant.bits=3``), so TensorBoard pointed at the sweep directory lists the runs by arm and seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# The run names and the resolvers of experiments/config.yaml live with the config (quest_pl.config.names): a
# training run names itself, and the TensorBoard hparams of a run list its arm, below this layer.
from quest_pl.config.names import (  # noqa: F401
    ARM_RESOLVER,
    SEEDS_RESOLVER,
    arm_name,
    quant_arm_name,
    register_resolvers,
    seed_list,
)

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks.report`` in ``experiments/config.yaml``): when a multirun ends, write the
    sweep's summary table, plots and PTQ rows into the sweep directory (:func:`quest_pl.report.write_report`), and,
    when the config has a ``scaling`` block (``experiment=scaling_law``), the scaling-law study
    (:func:`quest_pl.scaling.study.sweep_study`)."""

    def __init__(self, enabled: bool = True, ptq: bool = True) -> None:
        self.enabled = enabled
        self.ptq = ptq
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.enabled:
            return
        from quest_pl.config import ConfigError
        from quest_pl.report import write_report

        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        try:
            write_report(sweep_dir, echo=True, ptq=self.ptq)
        except ConfigError as e:  # e.g. a malformed metrics.json: one line naming the file
            log.error("sweep report failed: %s", e)
        except Exception:  # a report failure must not hide the finished runs
            log.exception("sweep report failed; rerun it with: python -m quest_pl.report %s", sweep_dir)
        if config.get("scaling") is not None:
            from quest_pl.scaling.study import sweep_study

            try:
                sweep_study(sweep_dir, OmegaConf.to_container(config.scaling, resolve=True))
            except Exception:  # never hide the finished runs; the study can be redone from the directory
                log.exception("scaling study failed; redo it with: python -m quest_pl.scaling fit %s --out %s",
                              sweep_dir, sweep_dir)  # fmt: skip
