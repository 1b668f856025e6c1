#!/usr/bin/env bash
# Set up .venv if needed, then run the main job. Extra arguments are Hydra overrides passed to run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python run.py "$@"
