"""The command line checked before Hydra runs anything: every override names a key or group option that exists (one
line with the closest match otherwise, not Hydra's multi-line composition error), and every job the command would
start (each arm of a sweep) composes and validates, so a bad input exits before any run directory is created."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quest_pl.config import CONFIG_DIR, ConfigError, suggest

# Appending a key nothing reads is an error, except where the key is passed through to a constructor: Trainer
# arguments (checked against the Trainer's signature in quest_pl.config), new loggers and callbacks (`_target_`).
APPENDABLE = ("trainer", "logger", "callbacks")
MAX_CHECKED_ARMS = 256


def group_options(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    return {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in config_dir.iterdir() if p.is_dir()}


def check_group_choices(config_dir: Path, argv: list[str]) -> None:
    """``group=option`` overrides name existing options (kept for callers of the earlier API)."""
    check_overrides(parse(argv), group_options(config_dir))


def parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([o for o in overrides if "=" in o or o.startswith("~")])
    except Exception as e:  # OverrideParseException: Hydra's message is several lines; the first says it
        raise ConfigError(f"cannot parse the command line: {str(e).strip().splitlines()[0]}") from None


def _values(o) -> list[str]:
    if o.is_sweep_override():
        try:
            return [str(v) for v in o.sweep_string_iterator()]
        except Exception:  # glob sweeps and the like: Hydra expands them against the group itself
            return []
    v = o.value()
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def check_overrides(parsed: list, groups: dict[str, list[str]]) -> None:
    """Group options exist (``model=llama_1b``), before anything is composed."""
    for o in parsed:
        key = o.key_or_group
        if _is_hydra(key) or key not in groups or o.is_delete():
            continue
        for v in _values(o):
            if v not in groups[key] and v != "null":
                raise ConfigError(
                    f"{key}={v!r}: unknown option{suggest(v, groups[key])} (available: {', '.join(groups[key])})"
                )


def _keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a config container, inner nodes included."""
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(f"{prefix}{k}")
            out |= _keys(v, f"{prefix}{k}.")
    return out


def check_keys(parsed: list, base: DictConfig, groups: dict[str, list[str]]) -> None:
    """Every ``key=value`` names a key of the composed config; ``+key=value`` appends only where something reads it."""
    job = {k: v for k, v in OmegaConf.to_container(base, resolve=False).items() if k != "hydra"}
    keys = _keys(job)
    candidates = keys | set(groups)
    for o in parsed:
        key = o.key_or_group
        if _is_hydra(key) or key in groups:
            continue
        exists = key in keys
        shown = o.input_line
        if o.is_add() and exists:
            raise ConfigError(f"{shown}: {key} already exists; set it without the +")
        if exists or o.is_force_add():
            continue
        top = key.split(".")[0]
        if o.is_add():
            if top in APPENDABLE and "." in key:
                continue  # checked where it is passed through (quest_pl.config.validate)
            raise ConfigError(f"{shown}: unknown key, nothing reads it{suggest(key, candidates)}")
        hint = ""
        if top == "trainer" and "." in key:
            from quest_pl.config import trainer_parameters

            name = key.split(".", 1)[1]
            if name in trainer_parameters():
                hint = f"; a Trainer argument not in the trainer config: append it with +{shown}"
        raise ConfigError(f"{shown}: unknown key{hint or suggest(key, candidates)}")


def translate(e: Exception, parsed: list) -> ConfigError:
    """Hydra's composition error as one line naming the override."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "No match in the defaults list" in first:
        for o in parsed:
            if f"'{o.key_or_group}'" in first:
                return ConfigError(
                    f"{o.input_line}: {o.key_or_group} is not in the defaults list; append it with +{o.input_line}"
                )
    return ConfigError(first)


def compose_checked(overrides: list[str], parsed: list) -> DictConfig:
    from quest_pl.config import compose

    try:
        return compose(*overrides, return_hydra_config=True)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition errors, an interpolation that does not resolve, ...
        raise translate(e, parsed) from None


def job_overrides(argv_overrides: list[str]) -> tuple[list, list[list[str]], DictConfig]:
    """Parse and check the overrides; return them parsed, the override list of every job the command starts (one
    for a single run, one per arm of a sweep), and the config composed from the group choices."""
    groups = group_options()
    parsed = parse(argv_overrides)
    check_overrides(parsed, groups)
    first = []  # the command with each sweep at its first value
    sweeps: dict[str, tuple[str, list[str]]] = {}
    for o in parsed:
        if o.is_sweep_override():
            values = _values(o)
            if not values:
                first.append(o.input_line)
                continue
            element = o.get_key_element()
            sweeps[o.key_or_group] = (element, values)
            first.append(f"{element}={values[0]}")
        else:
            first.append(o.input_line)
    group_only = [line for line, o in zip(first, parsed, strict=False) if o.key_or_group in groups]
    group_only += [o.input_line for o in parsed if _is_hydra(o.key_or_group)]
    base = compose_checked(group_only, parsed)
    check_keys(parsed, base, groups)
    full = compose_checked(first, parsed)
    # Sweeps an experiment file declares (hydra.sweeper.params), unless the command line sweeps the same key.
    params = OmegaConf.select(full, "hydra.sweeper.params", default=None) or {}
    for key, spec in params.items():
        if key not in sweeps and not any(o.key_or_group == key for o in parsed):
            (o,) = parse([f"{key}={spec}"])
            values = _values(o)
            if values:
                sweeps[key] = (o.get_key_element(), values)
    if not sweeps:
        return parsed, [first], full
    fixed = [line for line, o in zip(first, parsed, strict=False) if o.key_or_group not in sweeps]
    arms = []
    for combo in itertools.islice(itertools.product(*(v for _, v in sweeps.values())), MAX_CHECKED_ARMS):
        arms.append(fixed + [f"{el}={v}" for (el, _), v in zip(sweeps.values(), combo, strict=True)])
    return parsed, arms, full
