"""When a diagnostic measures: ``every_n_steps`` (and ``persist_every``) as a number of steps or ``auto``, and the
launch-time check that a fixed cadence measures something after step 0 (METHOD.md §4). Plain Python (no Lightning):
the command line checks every job of a sweep with it before the first one starts."""

from __future__ import annotations

from quest_pl.config import ConfigError

AUTO = "auto"


def check_every(name: str, value) -> None:
    """``value`` is a positive integer or ``auto`` (ValueError otherwise)."""
    if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: expected a positive integer or {AUTO}")


def resolve_every(value, max_steps: int, points: int) -> int:
    """A cadence in steps: ``auto`` gives about ``points`` measurements after step 0 within ``max_steps``."""
    return max(1, int(max_steps) // points) if value == AUTO else int(value)


# The cadence keys of the diagnostics' configs (checked at launch).
CADENCE_KEYS = ("every_n_steps", "persist_every")


def check_cadences(callbacks_cfg, max_steps: int) -> None:
    """Refuse (one-line :class:`ConfigError`) a fixed cadence of a diagnostic in ``callbacks`` that measures nothing
    after step 0 within ``max_steps`` steps (the steps measured are 0 .. max_steps - 1)."""
    for name, spec in (callbacks_cfg or {}).items():
        if spec is None or not hasattr(spec, "get") or "_target_" not in spec:
            continue
        for key in CADENCE_KEYS:
            value = spec.get(key)
            if value is None or value == AUTO:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"callbacks.{name}.{key}={value!r}: expected a positive integer or {AUTO}")
            if value >= max_steps:
                raise ConfigError(
                    f"callbacks.{name}.{key}={value}: measures nothing after step 0 within trainer.max_steps="
                    f"{max_steps}; set it to {AUTO} (spread over the run) or below {max_steps}"
                )
