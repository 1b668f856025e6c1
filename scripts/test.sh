#!/usr/bin/env bash
# Set up .venv if needed, then lint (ruff check + format check + the import contracts of pyproject.toml) and run the
# test suite on CPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
