#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent: a no-op when nothing changed).
#
# Which torch, decided once and printed:
#   cuda       nvidia-smi works: pip's default torch (the CUDA build), no constraints.
#   local      no working GPU, and pip's own configuration (find-links) reaches the CPU wheel torch==$LOCAL_TORCH
#              without the network: that wheel (fast, offline).
#   cpu-index  no working GPU otherwise: the CPU build from PyTorch's CPU wheel index ($CPU_INDEX), installed first
#              and then pinned, so the project's dependencies never pull a multi-GB CUDA build.
# Both CPU cases also apply requirements/cpu-constraints.txt (triton, numpy) and add the [triton] extra (the tests run
# the kernels through Triton's interpreter); the CUDA build brings its own triton. Every case installs the [dev] and
# [hf] extras (pytest, ruff; transformers and compressed-tensors), so the Hugging Face tests run, none skipped.
#
# Environment: PYTHON (interpreter, 3.10+, default python3); QUEST_TORCH=cuda|local|cpu-index forces a choice;
# QUEST_NO_UV=1 uses pip even where uv is on PATH; QUEST_SETUP_PLAN=1 prints the choice and the install commands
# without running them (used by tests/test_setup_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCAL_TORCH=2.13.0+cpu
CPU_INDEX=https://download.pytorch.org/whl/cpu
constraints=requirements/cpu-constraints.txt
plan=${QUEST_SETUP_PLAN:-}

# The local wheel's pip report (JSON) when pip's configuration reaches it offline, else nothing. $1: a python with pip.
local_torch_report() {
  "$1" -m pip install --dry-run --quiet --no-deps --no-index --ignore-installed --report - "torch==$LOCAL_TORCH" \
    2>/dev/null || true
}

# Prints cuda, local or cpu-index. $1: a python with pip.
torch_source() {
  case "${QUEST_TORCH:-}" in
    cuda | local | cpu-index) echo "$QUEST_TORCH"; return ;;
    "") ;;
    *) echo "error: QUEST_TORCH=$QUEST_TORCH: expected cuda, local or cpu-index" >&2; exit 2 ;;
  esac
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo cuda
  elif [ -n "$(local_torch_report "$1")" ]; then
    echo local
  else
    echo cpu-index
  fi
}

run() {
  if [ -n "$plan" ]; then echo "+ $*"; else "$@"; fi
}

if [ -n "$plan" ]; then
  py=$PYTHON
else
  if command -v sha256sum >/dev/null 2>&1; then sha=(sha256sum); else sha=(shasum -a 256); fi  # shasum on macOS
  key=$(cat setup.cfg pyproject.toml scripts/setup.sh "$constraints" | "${sha[@]}" | cut -c1-16)-${QUEST_TORCH:-auto}
  stamp=.venv/.setup-$key
  if [ -f "$stamp" ]; then
    exit 0
  fi
  echo "Setting up .venv (one time, about a minute) ..."
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # A current pip first: the local-wheel check below needs `pip install --dry-run --report` (pip >= 22.2).
  .venv/bin/python -m pip install -q --upgrade pip
  py=.venv/bin/python
fi

source=$(torch_source "$py")
use_uv=""
if [ -z "${QUEST_NO_UV:-}" ] && command -v uv >/dev/null 2>&1; then
  use_uv=1
fi
# pip_install ARGS...: into .venv, with uv when present (uv ignores pip's configuration: the callers pass what it needs).
pip_install() {
  if [ -n "$use_uv" ]; then
    run uv pip install --python .venv/bin/python "$@"
  else
    run .venv/bin/python -m pip install -q "$@"
  fi
}

pin=.venv/.torch-pin.txt
case "$source" in
  cuda)
    echo "torch: CUDA build from the default index (nvidia-smi works)"
    pip_install -e ".[dev,hf]"
    ;;
  local)
    echo "torch: local CPU wheel torch==$LOCAL_TORCH from pip's configured wheel folder (no working GPU)"
    links=()
    if [ -n "$use_uv" ]; then  # uv does not read pip's find-links: point it at the folder holding the wheel
      url=$(local_torch_report "$py" | "$py" -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])')
      links=(--find-links "$(dirname "${url#file://}")")
    fi
    run sh -c "echo 'torch==$LOCAL_TORCH' > $pin"
    pip_install ${links[@]+"${links[@]}"} -c "$constraints" -c "$pin" -e ".[dev,hf,triton]"
    ;;
  cpu-index)
    echo "torch: CPU build from $CPU_INDEX (no working GPU, no local CPU wheel torch==$LOCAL_TORCH)"
    pip_install --index-url "$CPU_INDEX" torch
    run sh -c ".venv/bin/python -c 'import torch; print(\"torch==\" + torch.__version__)' > $pin"
    pip_install -c "$constraints" -c "$pin" -e ".[dev,hf,triton]"
    ;;
esac

if [ -z "$plan" ]; then
  rm -f .venv/.setup-*
  touch "$stamp"
  echo "Set up .venv (torch: $source)"
fi
