"""Diagnostic for RESULTS.md (LSQ/PACT section), not a training option: train with every LSQ/PACT scale re-initialised
from each training batch during the first K steps (the LR warmup), then learned as usual.

    PYTHONPATH=. python scripts/learned_scale_warmup_init.py 40 experiment=estimator_ablation hydra.mode=RUN \\
        quant=lsq_w4a4 seed=0 hydra.run.dir=outputs/lsq_warmup_init_s0

It answers one question: are the LSQ/PACT arms' heavily clipped activations (and their lead over BF16) a consequence
of scales initialised on the first batch, before the activations grow? The usual init (METHOD.md §1.9) is untouched.
"""

import sys

import lightning as L

import quest_pl.train as train_mod
from quest_pl.estimators import learned

STEPS = int(sys.argv.pop(1))
_calibrating = {"on": False}
_initialize = learned.LearnedScale.maybe_initialize


def _maybe_initialize(self, x):
    if _calibrating["on"] and self.training:
        self.initialized.fill_(False)
        self._initialized_seen = False
    _initialize(self, x)


class _Calibrate(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _calibrating["on"] = trainer.global_step < STEPS

    def on_train_batch_end(self, *args):
        _calibrating["on"] = False


learned.LearnedScale.maybe_initialize = _maybe_initialize
_build = train_mod.build_callbacks
train_mod.build_callbacks = lambda cfg, run_dir: [*_build(cfg, run_dir), _Calibrate()]

if __name__ == "__main__":
    from quest_pl.cli import cli

    cli()
