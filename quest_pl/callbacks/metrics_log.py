"""The run's own metrics log, ``<run dir>/metrics.jsonl``, written whatever Lightning logger the config chose
(TensorBoard, CSV, W&B, several or none): the sweep report, its figures and the HParams table read it, so they do
not depend on the logger.

Format (stable; studies read it): one JSON object per line, ``{"step": <optimizer step>, "<tag>": <value>, ...}``,
the tags and steps Lightning's loggers receive (``train/loss``, ``val/loss``, ``align/model``, ``mask/frac/...``).
Each record is one ``write`` on a file opened for appending, so a killed run leaves at most a torn last line, which
:func:`read_metrics_log` skips. A resumed run logs the steps after its checkpoint again, with the same values: the
reader keeps the last value of each (tag, step).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

METRICS_LOG = "metrics.jsonl"


class MetricsLog(Logger):
    """A Lightning logger appending every ``log_metrics`` call to ``<save_dir>/metrics.jsonl`` (rank zero only)."""

    def __init__(self, save_dir: str | Path):
        super().__init__()
        self._save_dir = str(save_dir)
        self.path = Path(save_dir) / METRICS_LOG

    @property
    def name(self) -> str:
        return "metrics_log"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Hyperparameters live in ``.hydra/config.yaml`` and ``metrics.json``; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record = {"step": step}
        for k, v in metrics.items():
            v = float(v.item() if hasattr(v, "item") else v)
            record[k] = v if math.isfinite(v) else None  # strict JSON: a non-finite value is null
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)


def read_metrics_log(run_dir: str | Path) -> dict[str, list[tuple[int, float]]] | None:
    """Every scalar of a run's ``metrics.jsonl``: tag -> [(step, value), ...] in step order, the last value logged at
    each step kept; ``None`` when the run has no log (written before the log existed). Non-finite values (null) and
    a torn last line are skipped."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return None
    series: dict[str, dict[int, float]] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            step = record["step"]
            for tag, value in record.items():
                if tag != "step" and isinstance(value, (int, float)):
                    series.setdefault(tag, {})[step] = float(value)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def last_step(run_dir: str | Path) -> int | None:
    """The largest step in a run's metrics log (how far an interrupted run got), ``None`` without a log."""
    series = read_metrics_log(run_dir)
    if not series:
        return None
    return max(points[-1][0] for points in series.values())
