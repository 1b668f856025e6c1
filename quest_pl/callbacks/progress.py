"""Progress when the output is not a terminal (a log file, a scheduler's capture): one line every few percent of the
run, as nanoGPT prints ``iter N: loss, time``, instead of Lightning's bar (which only writes escape sequences there)::

    step 40/400  loss 5.8123  14,210 tokens/s  ETA 3m05s

The first line comes after the first optimizer step, the others every ``every`` steps (a multiple of
``trainer.log_every_n_steps``, about 20 lines per run). The loss is read only on those steps, so the cost per step is
one integer comparison.
"""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("quest_pl")
LINES_PER_RUN = 20


def eta_text(seconds: float) -> str:
    seconds = round(max(0.0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLines(L.Callback):
    """A progress line on rank zero every ``every`` optimizer steps (see the module docstring)."""

    def __init__(self, max_steps: int, log_every_n_steps: int = 1):
        base = max(1, int(log_every_n_steps))
        self.max_steps = int(max_steps)
        self.every = max(base, round(self.max_steps / LINES_PER_RUN / base) * base)
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._last is None or step == self._last[1] or not trainer.is_global_zero:
            return
        if step % self.every and step != self._start[1] + 1 and step != self.max_steps:
            return
        now = time.perf_counter()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f"loss {float(loss):.4f}  " if loss is not None else ""
        tokens = (step - self._last[1]) * getattr(pl_module, "tokens_per_step", 0)
        rate = tokens / (now - self._last[0]) if now > self._last[0] else 0.0
        per_step = (now - self._start[0]) / max(1, step - self._start[1])
        log.info(
            "step %d/%d  %s%s tokens/s  ETA %s",
            step,
            self.max_steps,
            loss_text,
            f"{rate:,.0f}",
            eta_text(per_step * (self.max_steps - step)),
        )
        self._last = (now, step)
