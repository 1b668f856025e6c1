"""The command line: ``quest-pl [group=option ...] [key=value ...]`` (or ``python run.py ...`` in a checkout).

Config groups live in ``experiments/`` (model, data, optim, trainer, callbacks, logger, quant, experiment). A user
error (bad value, missing file, unknown option) prints one line naming the key and exits with status 2.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from quest_pl.config import CONFIG_DIR, ConfigError
from quest_pl.overrides import check_group_choices
from quest_pl.sweep import register_resolvers

log = logging.getLogger("quest_pl")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from quest_pl.train import train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if cfg.get("probe") is not None and cfg.probe.get("from"):  # alignment probe of a checkpoint (quest_pl.probe)
            from quest_pl.probe import run as run_probe

            run_probe(cfg, run_dir)
            return None
        if cfg.ptq.get("from"):  # data-free PTQ of a checkpoint instead of training
            from quest_pl.ptq import run as run_ptq

            metrics = run_ptq(cfg, run_dir)
        else:
            metrics = train(cfg, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if metrics["rank"] == 0:
        print(
            f"final val/loss={metrics['val/loss']:.4f} val/ppl={metrics['val/ppl']:.2f} after {metrics['step']} steps "
            f"({metrics['wall_s']:.1f} s); run dir: {HydraConfig.get().runtime.output_dir}"
        )
    return metrics.get("val/loss")


def cli() -> None:
    """Entry point of ``quest-pl`` and ``run.py``."""
    register_resolvers()  # ${arm_name:...} in run_name, before Hydra composes
    try:
        check_group_choices(CONFIG_DIR, sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
