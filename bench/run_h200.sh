#!/usr/bin/env bash
# Issue #15's measurements: GPU tests, then the benchmarks of BENCHMARKS.md §a-d, each under its own time limit, logs
# under $OUT (or ./bench_out). All steps take about 11 minutes on an H200, so split them over two device calls:
# ONLY="tests quantizer linear prefill" (~6 min) and ONLY="train_200m train_30m" (~5.5 min). Run from the repository root;
# Hydra's wheels (hydra-core, omegaconf, antlr4-python3-runtime) in ./.whl when the image lacks them, and the token
# cache in ./.tokcache when the image lacks `datasets` (build it where datasets is installed:
# QUEST_CACHE=$PWD/.tokcache, then the datamodule's prepare_data()). ONLY="train_200m ..." runs a subset of the steps.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
[ -d .tokcache ] && export QUEST_CACHE=$PWD/.tokcache
start=$(date +%s)
left() { echo $((${BUDGET_S:-570} - ($(date +%s) - start))); }
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  [ "$limit" -le 10 ] && { echo "== $name: skipped (no time left)"; return; }
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "Warning|warn\(" | tail -n "${TAIL:-40}"
  echo "== $name: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start ))s elapsed"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
TAIL=30 step tests 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_int8.py \
  tests/test_kernels.py::test_cuda_forward_backward_match_reference tests/test_kernels.py::test_torch_compile_fullgraph
step quantizer 60 python3 bench/bench_quantizer.py --no-torch --shapes 16384x2048 65536x2048
TAIL=60 step linear 100 python3 bench/bench_linear.py --profile
step prefill 120 python3 bench/bench_prefill.py
TAIL=14 step train_200m 260 python3 bench/bench_train.py --preset llama_200m --steps 40 --json "$OUT/train_200m.json"
TAIL=14 step train_30m 200 python3 bench/bench_train.py --preset llama_30m --steps 40 --json "$OUT/train_30m.json"
