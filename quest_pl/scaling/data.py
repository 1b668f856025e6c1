"""The runs a scaling law is fitted to, read from CSV files or sweep directories and checked (docs/METHOD.md §9.2).

A CSV has the header ``precision,params,tokens,loss`` (any order), optionally ``bits`` and ``seed``; lines starting
with ``#`` are comments. ``params`` counts non-embedding parameters, ``tokens`` the training tokens, ``loss`` the final
validation loss in nats/token, ``bits`` the bits per parameter of that precision's weights (when absent: 16 for a
name without ``_w<b>`` bits, else ``<b>``). A sweep directory is read job by job with :func:`read_job`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED = ("precision", "params", "tokens", "loss")
OPTIONAL = ("bits", "seed")
_WEIGHT_BITS = re.compile(r"_w([0-9]+(?:\.[0-9]+)?)(?:a[0-9.]+)?$")


class InputError(ValueError):
    """Input a fit cannot use (a file, a column, a value): one line naming it."""


@dataclass
class Runs:
    """Finished runs, one entry per run, in input order."""

    precision: list[str] = field(default_factory=list)
    params: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    bits: list[float] = field(default_factory=list)
    seed: list[int | None] = field(default_factory=list)
    source: list[str] = field(default_factory=list)  # "file:line" or the job directory
    notes: list[str] = field(default_factory=list)  # what the reader left out, and why
    pipeline_check: str | None = None  # a sweep's ``scaling.pipeline_check`` label

    def __len__(self) -> int:
        return len(self.loss)

    def add(self, precision, params, tokens, loss, bits, seed, source) -> None:
        for name, value in (("params", params), ("tokens", tokens), ("loss", loss), ("bits", bits)):
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{source}: {name}={value!r}: expected a finite number > 0")
        self.precision.append(precision)
        self.params.append(float(params))
        self.tokens.append(float(tokens))
        self.loss.append(float(loss))
        self.bits.append(float(bits))
        self.seed.append(seed)
        self.source.append(source)

    def extend(self, other: Runs) -> None:
        for name in ("precision", "params", "tokens", "loss", "bits", "seed", "source", "notes"):
            getattr(self, name).extend(getattr(other, name))
        self.pipeline_check = self.pipeline_check or other.pipeline_check

    def subset(self, keep: list[int]) -> Runs:
        out = Runs(notes=list(self.notes), pipeline_check=self.pipeline_check)
        for name in ("precision", "params", "tokens", "loss", "bits", "seed", "source"):
            values = getattr(self, name)
            setattr(out, name, [values[i] for i in keep])
        return out

    def precisions(self) -> list[str]:
        """Distinct precisions in first-appearance order."""
        return list(dict.fromkeys(self.precision))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.log(self.params), np.log(self.tokens), np.log(self.loss)

    def bits_of(self, precision: str) -> float:
        """Bits per parameter of a precision: the mean over its runs (they differ only by scale overhead)."""
        return float(np.mean([b for p, b in zip(self.precision, self.bits) if p == precision]))


def name_bits(precision: str) -> float:
    """Bits per weight from a precision's name: ``quest_w4a4`` -> 4, ``quest_w2a16`` -> 2, no ``_w<b>``: 16."""
    m = _WEIGHT_BITS.search(precision)
    return float(m.group(1)) if m else 16.0


def _number(text: str, column: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{where}: {column}={text!r}: expected a number") from None


def read_csv(path: Path) -> Runs:
    """Runs of a CSV file (module docstring). Raises :class:`InputError` naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")]
    if not numbered:
        raise InputError(f"{path}: no header line (expected {','.join(REQUIRED)})")
    rows = list(csv.reader(line for _, line in numbered))
    header = [h.strip() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (header {','.join(header)};"
            f" expected {','.join(REQUIRED)}, optionally {', '.join(OPTIONAL)})"
        )
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if unknown or len(set(header)) != len(header):
        what = f"unknown column {unknown[0]!r}" if unknown else "a repeated column"
        raise InputError(f"{path}: {what} (allowed: {', '.join(REQUIRED + OPTIONAL)})")
    runs = Runs()
    for (lineno, _), row in zip(numbered[1:], rows[1:]):
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise InputError(f"{where}: {len(row)} fields, the header has {len(header)}")
        cell = dict(zip(header, (c.strip() for c in row)))
        if not cell["precision"]:
            raise InputError(f"{where}: empty precision")
        values = {c: _number(cell[c], c, where) for c in ("params", "tokens", "loss")}
        bits = _number(cell["bits"], "bits", where) if cell.get("bits") else name_bits(cell["precision"])
        seed = None
        if cell.get("seed"):
            seed_value = _number(cell["seed"], "seed", where)
            if not seed_value.is_integer():
                raise InputError(f"{where}: seed={cell['seed']!r}: expected an integer")
            seed = int(seed_value)
        runs.add(cell["precision"], values["params"], values["tokens"], values["loss"], bits, seed, where)
    if not len(runs):
        raise InputError(f"{path}: no runs after the header")
    return runs


def read_job(job_dir: Path) -> dict | None:
    """One finished job of a sweep as ``{precision, params, tokens, loss, bits, seed, label}``, or None when the job
    has no final metrics yet or did not finish ok (diverged, failed). The one place that knows a job directory's layout:
    ``metrics.json`` (``val/loss``, ``non_embedding_params``, ``step``, ``status``) and ``.hydra/config.yaml``
    (quant group, model width, batch shape: the tokens seen are steps x global batch x sequence length; ``label``:
    the ``scaling.pipeline_check`` of ``experiment=scaling_law``)."""
    import json

    from omegaconf import OmegaConf

    from quest_pl.config.names import quant_arm_name, register_resolvers
    from quest_pl.quant import QuantConfig

    register_resolvers()
    metrics_path, config_path = job_dir / "metrics.json", job_dir / ".hydra" / "config.yaml"
    if not metrics_path.is_file() or not config_path.is_file():
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
        saved = OmegaConf.load(config_path)
        quant, model, data, trainer = (OmegaConf.to_container(saved[k], resolve=True) for k in KEYS)
        seed = saved.get("seed")
        label = OmegaConf.select(saved, "scaling.pipeline_check", default=None)
    except Exception as e:  # a damaged file: name it, never guess
        raise InputError(
            f"{job_dir}: unreadable metrics.json or .hydra/config.yaml ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(metrics, dict) or metrics.get("status", "ok") != "ok":
        return None
    devices = trainer.get("devices")
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes") or 1)
    step_tokens = data["batch_size"] * int(trainer.get("accumulate_grad_batches") or 1) * world * model["seq_len"]
    spec = QuantConfig.from_cfg(quant, None)
    weight = spec.weight if spec is not None else None
    bits = weight.build_grid().bits_per_element(model["d_model"]) if weight is not None else 16.0
    name = quant_arm_name(quant.get("name", "quant"), quant.get("grid"), quant.get("w_bits"), quant.get("a_bits"))
    loss, params, step = metrics.get("val/loss"), metrics.get("non_embedding_params"), metrics.get("step")
    if not all(isinstance(v, (int, float)) for v in (loss, params, step)):
        raise InputError(
            f"{metrics_path}: status ok but val/loss={loss!r}, non_embedding_params={params!r}, step={step!r}"
        )
    return {"precision": name, "params": float(params), "tokens": float(step * step_tokens), "loss": float(loss),
            "bits": float(bits), "seed": seed, "label": label}  # fmt: skip


KEYS = ("quant", "model", "data", "trainer")  # the config groups read_job reads
_JOB = re.compile(r"^\d+_")


def read_sweep(sweep_dir: Path) -> Runs:
    """Every finished job of a sweep directory (subdirectories ``<num>_...``), in job-number order."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if d.is_dir() and _JOB.match(d.name)), key=lambda d: int(d.name.split("_")[0])
    )
    runs = Runs()
    skipped = 0
    for job in jobs:
        row = read_job(job)
        if row is None:
            skipped += 1
            continue
        runs.add(row["precision"], row["params"], row["tokens"], row["loss"], row["bits"], row["seed"], str(job))
        runs.pipeline_check = runs.pipeline_check or row["label"]
    if not len(runs):
        raise InputError(f"{sweep_dir}: no finished job (no <num>_<arm>_s<seed>/metrics.json with status ok)")
    if skipped:
        runs.notes.append(f"{sweep_dir}: {skipped} of {len(jobs)} jobs not finished ok (left out)")
    return runs


def read_inputs(inputs: list[str | Path]) -> Runs:
    """Pool the runs of every input: a directory is a sweep, a file a CSV."""
    if not inputs:
        raise InputError("no input: give one or more CSV files or sweep directories")
    runs = Runs()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            runs.extend(read_sweep(path))
        elif path.is_file():
            runs.extend(read_csv(path))
        else:
            raise InputError(f"{item}: no such file or directory")
    return runs
