"""Prepare (or check) the token files of a data config once, before training:

    python -m quest_pl.data prepare data=c4 data.max_tokens=3e9 [data.tokenizer=...]
    python -m quest_pl.data verify data=c4 data.max_tokens=3e9

The arguments are the run's own overrides (the ``data`` keys decide the cache entry; the others are ignored), so a
training run given the same ``data`` overrides reads the prepared files. ``prepare`` continues an interrupted
preparation where it stopped; ``verify`` checks every segment digest of an entry. Errors are one line (exit 2);
Ctrl-C is one line too (exit 130), and the finished segments are kept for the next ``prepare``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

EXIT_SIGINT = 128 + 2  # as a shell reports a process ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quest_pl.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "verify"))
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, as for run.py (e.g. data=c4 data.max_tokens=3e9)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from quest_pl.config import ConfigError, compose, validate

    try:
        try:
            cfg = compose(*args.overrides)
        except Exception as e:  # Hydra: unknown group option, malformed override
            raise ConfigError(str(e).splitlines()[0]) from None
        validate(cfg)
        from omegaconf import OmegaConf

        from quest_pl.data import shards

        data = OmegaConf.to_container(cfg.data, resolve=True)
        if data["source"] == "bin":
            raise ConfigError("data.source=bin: already prepared (train.bin / val.bin are read as they are)")
        data["tokenizer"] = data.get("tokenizer") or data.get("tokenizer_path")
        spec = shards.DataSpec.from_hparams(data)
        start = time.perf_counter()
        if args.command == "prepare":
            entry = shards.prepare(spec)
        else:
            entry = shards.entry_path(spec)
            if not entry.is_dir():
                raise ConfigError(f"data: {entry} is not prepared (python -m quest_pl.data prepare ...)")
        try:
            meta = shards.verify_entry(entry, full=True)
        except shards.DamagedEntry as e:
            raise ConfigError(f"data: token cache {entry} is damaged ({e}); run prepare to rebuild it") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = "finished segments kept: the same command continues" if args.command == "prepare" else "nothing changed"
        print(f"\ninterrupted: {args.command} stopped ({what})", file=sys.stderr)
        return EXIT_SIGINT
    tokens = {s: meta["splits"][s]["tokens"] for s in shards.SPLITS}
    print(
        f"{entry}: {tokens['train']:,} train / {tokens['val']:,} validation tokens ({meta['dtype']}, vocabulary "
        f"{meta['vocab_size']:,}); {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
