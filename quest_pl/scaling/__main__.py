"""``python -m quest_pl.scaling fit INPUT... --out DIR [--law quest|quartet]``: fit a scaling law across precisions.

INPUT is a CSV (``precision,params,tokens,loss``, optionally ``bits``, ``seed``) or a sweep directory; several are
pooled. Writes ``DIR/scaling.json``, ``scaling.md`` and figures. Exit status: 0 done; 2 bad input (one ``error:``
line, nothing written); 1 the fit did not converge (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_NOT_CONVERGED = 1
EXIT_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits 2; keep it to one line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def parser() -> argparse.ArgumentParser:
    from quest_pl.scaling.fit import MAXITER
    from quest_pl.scaling.laws import LAWS
    from quest_pl.scaling.study import Options

    defaults = Options()
    p = _Parser(prog="python -m quest_pl.scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    f = sub.add_parser("fit", help="fit a law to CSV files and sweep directories")
    f.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV file or sweep directory")
    f.add_argument("--out", required=True, type=Path, help="output directory")
    f.add_argument("--law", default=defaults.law, choices=LAWS, help="quest: one eff(P); quartet: eff and eff_data")
    f.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="bootstrap replicates (0: no intervals)")
    f.add_argument("--seed", type=int, default=defaults.seed, help="seed of the bootstrap")
    f.add_argument("--reference", default=defaults.reference, help="the precision with eff = 1")
    f.add_argument("--tokens-per-param", type=float, default=None,
                   help="the frontier's tokens per parameter (default: the reference runs' median)")  # fmt: skip
    f.add_argument("--maxiter", type=int, default=MAXITER, help="function evaluations per polish")
    return p


def main(argv: list[str] | None = None) -> int:
    from quest_pl.scaling.data import InputError
    from quest_pl.scaling.fit import NotConverged
    from quest_pl.scaling.study import Options, run

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = Options(args.law, args.bootstrap, args.seed, args.reference, args.tokens_per_param)
    try:
        if args.maxiter < 1:
            raise InputError(f"--maxiter={args.maxiter}: expected an integer >= 1")
        if args.out.exists() and not args.out.is_dir():
            raise InputError(f"--out={str(args.out)!r}: a file, not a directory")
        summary = run(args.inputs, args.out, options, maxiter=args.maxiter)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except NotConverged as e:
        print(f"error: {e}; nothing written (raise --maxiter, or check the runs)", file=sys.stderr)
        return EXIT_NOT_CONVERGED
    print(summary["frontier"]["answer"])
    effs = ", ".join(f"{p} {v:.3f}" for p, v in summary["eff"].items())
    print(f"eff(P): {effs}\nwrote {args.out / 'scaling.json'}, scaling.md and figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
