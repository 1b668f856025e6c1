"""Scaling laws across precisions (docs/METHOD.md §9): fit ``L(N, D, P)`` to finished runs, eff(P) with bootstrap
intervals, and the memory frontier.

    python -m quest_pl.scaling fit runs.csv multirun/scaling_law/2026-12-07_05-00-00 --out scaling/ [--law quartet]

Modules: ``laws`` (the QuEST and Quartet laws), ``data`` (CSV and sweep readers), ``fit`` (Huber fit: grid starts
and a polish), ``bootstrap`` (intervals), ``frontier``, ``study`` (the whole study, also run at the end of an
``experiment=scaling_law`` sweep), ``report`` (``scaling.md``), ``figures``.
"""

from pathlib import Path

PAPER_RUNS = Path(__file__).resolve().parent / "data" / "quest_paper_runs.csv"
