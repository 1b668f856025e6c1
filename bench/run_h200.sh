#!/usr/bin/env bash
# Issue #26's measurements: GPU tests, then the benchmarks of BENCHMARKS.md, each under its own time limit, logs under
# $OUT (or ./bench_out). Split over two device calls of under 10 minutes:
#   ONLY="tests quantizer gemm linear train_30m"   (~9.5 min with QSHAPES=65536x2048 QSWEEP= GSHAPES=16384x2048x5632)
#   ONLY="train_200m prefill"                      (~5.5 min)
#   tests: every test marked gpu (-m gpu over tests/); tests_cuda: the kernel test files in full, on CUDA.
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
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# pytest-xdist when the image has it: the Triton compilations of the kernel tests run in parallel.
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
# Every test marked gpu in the suite (a module that cannot be imported here is reported, the others still run).
TAIL=30 step tests 120 python3 -m pytest -q -p no:cacheprovider --tb=short $XDIST --continue-on-collection-errors -m gpu \
  tests/
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
# The kernel test files in full on the GPU: their unmarked tests run on CUDA too when it is there (compiled kernels
# against the PyTorch reference, not the interpreter).
TAIL=30 step tests_cuda 150 python3 -m pytest -q -p no:cacheprovider --tb=short $XDIST tests/test_fp8.py tests/test_int8.py \
  tests/test_kernels.py tests/test_quant.py
