"""Early check of ``group=option`` command-line overrides, so an unknown option is one clear line, not Hydra's
multi-line composition error."""

from pathlib import Path

from quest_pl.config import ConfigError


def check_group_choices(config_dir: Path, argv: list[str]) -> None:
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    for arg in argv:
        if "=" not in arg or arg.startswith("hydra."):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "," in value or value in ("null", ""):
            continue
        options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        if value not in options:
            raise ConfigError(f"{key}={value!r}: unknown option; available: {', '.join(options)}")
