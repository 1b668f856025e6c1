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
# One worker per core (pytest-xdist), a test file's tests on one worker (they share module fixtures, and the DDP
# tests one port). QUEST_TEST_WORKERS=0 runs in this process.
exec .venv/bin/python -m pytest -n "${QUEST_TEST_WORKERS:-auto}" --dist loadfile "$@"
