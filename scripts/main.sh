#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the estimator ablation (a sweep of 7 arms with a summary table and
# plots). Arguments, if any, replace it: they are Hydra overrides passed to run.py (e.g. experiment=smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- experiment=estimator_ablation
fi
exec .venv/bin/python run.py "$@"
