#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent: a no-op when nothing changed).
#
# CPU machines pin the local CPU build of torch through requirements/cpu-constraints.txt, so no multi-GB CUDA build is
# ever pulled. On a machine with an NVIDIA driver (nvidia-smi present) the constraints are skipped and pip picks the
# CUDA build. PYTHON chooses the interpreter (default python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
constraints=requirements/cpu-constraints.txt
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  constraints=""
fi
key=$(cat setup.cfg pyproject.toml scripts/setup.sh ${constraints:+"$constraints"} | sha256sum | cut -c1-16)
stamp=.venv/.setup-$key
if [ -f "$stamp" ]; then
  exit 0
fi

echo "Setting up .venv (one time, about a minute) ..."
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$constraints" ]; then
  .venv/bin/python -m pip install -q -c "$constraints" -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e ".[dev]"
fi
rm -f .venv/.setup-*
touch "$stamp"
echo "Set up .venv"
