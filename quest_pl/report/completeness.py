"""What a sweep's report says is missing: every job of the sweep's plan (``sweep.json``, :mod:`quest_pl.sweep_plan`)
with its state on disk, and the line ``incomplete: k of n jobs finished ...`` at the top of the console output and of
``summary.md`` when any planned job is not finished (``ok`` or ``diverged``)."""

from __future__ import annotations

from pathlib import Path

from quest_pl.sweep_plan import FINISHED, job_states


def planned_jobs(sweep_dir: Path) -> list[dict]:
    """Every planned job with ``dir``, ``arm``, ``seed``, ``status``, ``step``, ``max_steps``, ``val/loss``, ``error``;
    ``[]`` for a sweep without a plan (written before plans were recorded)."""
    return job_states(sweep_dir)


def _step_text(job: dict) -> str:
    step, max_steps = job.get("step"), job.get("max_steps")
    if step is None:
        return "-"
    return f"{step} of {max_steps}" if max_steps else str(step)


def incomplete_line(sweep_dir: Path, jobs: list[dict]) -> str | None:
    """``incomplete: k of n jobs finished; ...`` naming what the others are and how to finish them; ``None`` when
    every planned job finished."""
    if not jobs:
        return None
    finished = [j for j in jobs if j["status"] in FINISHED]
    if len(finished) == len(jobs):
        return None
    parts = []
    for status in ("interrupted", "failed", "not started"):
        count = sum(j["status"] == status for j in jobs)
        if count:
            parts.append(f"{count} {status}")
    return (
        f"incomplete: {len(finished)} of {len(jobs)} jobs finished ({', '.join(parts)}); "
        f"finish it with: python run.py sweep.resume={sweep_dir}"
    )


def jobs_table(jobs: list[dict]) -> str:
    """Markdown table of every planned job: directory, arm, seed, status, step reached of max, final loss, error."""
    cols = ("job", "arm", "seed", "status", "step", "val_loss", "error")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for j in jobs:
        loss = j.get("val/loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        error = (j.get("error") or "-").replace("|", "/")
        cells = (j["dir"], j["arm"], str(j["seed"]), j["status"], _step_text(j), loss_text, error)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unfinished_lines(jobs: list[dict]) -> list[str]:
    """One console line per planned job that is not finished."""
    return [
        f"  {j['dir']}: {j['status']}"
        + (f" at step {_step_text(j)}" if j["status"] == "interrupted" else "")
        + (f" ({j['error']})" if j.get("error") else "")
        for j in jobs
        if j["status"] not in FINISHED
    ]
