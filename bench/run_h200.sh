#!/usr/bin/env bash
# Issue #26's measurements: GPU tests, then the benchmarks of BENCHMARKS.md, each under its own time limit, logs under
# $OUT (or ./bench_out). Split over two device calls of under 10 minutes:
#   ONLY="tests quantizer gemm linear train_30m"   (~9.5 min with QSHAPES=65536x2048 QSWEEP= GSHAPES=16384x2048x5632)
#   ONLY="train_200m prefill"                      (~5.5 min)
# Run from the repository root; Hydra's wheels (hydra-core, omegaconf, antlr4-python3-runtime) in ./.whl when the image
# lacks them, and the token cache in ./.tokcache when the image lacks `datasets` (build it where datasets is installed:
# QUEST_CACHE=$PWD/.tokcache, then the datamodule's prepare_data() for each preset). BUDGET_S caps the whole script.
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
TAIL=25 step tests 80 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/test_fp8.py tests/test_int8.py \
  tests/test_kernels.py
TAIL=45 step quantizer 100 python3 bench/bench_quantizer.py --no-torch --shapes ${QSHAPES:-16384x2048 65536x2048} \
  ${QSWEEP---sweep}
step gemm 80 python3 bench/bench_gemm.py ${GSHAPES:+--shapes $GSHAPES}
TAIL=120 step linear 130 python3 bench/bench_linear.py --profile
ARMS=(bf16 "quest_w4a4 int8" "quest_w4a4 int8 fp8-bwd")
TAIL=30 step train_30m 280 python3 bench/bench_train.py --preset llama_30m --steps 40 --seeds 0 1 --arms "${ARMS[@]}" \
  --json "$OUT/train_30m.json"
TAIL=14 step train_200m 230 python3 bench/bench_train.py --preset llama_200m --steps 40 --arms "${ARMS[@]}" \
  --json "$OUT/train_200m.json"
step prefill 100 python3 bench/bench_prefill.py
