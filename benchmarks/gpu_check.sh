#!/usr/bin/env bash
# One prepared device call for the Triton backends (no network needed), under 9 minutes of wall time on an
# H100/H200: every phase runs under `timeout`, and the limits add up to 539 s (tests/test_benchmark_cli.py
# checks the sum), so a hang in one phase still leaves the others' results.
#   1. machine: card, driver, versions                                           (timeout 10 + 10 s)
#   2. install the package against the machine's torch (no build isolation, no deps, no extension build)
#                                                                                (timeout  30 s)
#   3. compile check + the CUDA test tier of tests/test_triton.py                (timeout 144 s)
#      and of tests/test_triton_persistent.py                                    (timeout  60 s)
#      and tests/test_compile.py's (opcheck, fullgraph compile on the GPU)       (timeout  30 s)
#   4. `python -m benchmarks` at the s-MNIST, char-PTB and generic presets       (timeout 95 + 80 + 80 s)
#      (--time-budget 25 s under each: rows not reached are reported skipped and the records still written):
#      every registered Triton variant (benchmarks/candidates.py VARIANTS: per-step launches, persistent
#      kernels) at fp32 IEEE, TF32 and bf16, against nn.LSTM (cuDNN) at the same three and the reference at
#      fp32, in forward+backward, training forward and eval forward, naming the kernels each row ran (cuDNN
#      algorithm, tensor-core math).
# Everything lands in $OUT (default ./gpu_out): machine.txt, install.log, pytest.log, pytest_persistent.log,
# pytest_compile.log, bench_<preset>.log, bench/<preset>_cuda_*.{json,csv,png}, and bench.md (every table).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/bench"
PYTHON="${PYTHON:-python3}"
status=0

# The benchmark's command line, shared by every preset below; tests/test_benchmark_cli.py runs this same
# line on CPU at a tiny shape (where tf32 is noted and skipped).
BENCH_ARGS=(--modes forward+backward forward-train eval-forward --precisions fp32 tf32 bf16 --repeats 10 --reference-every 5 --kernels on --no-progress)

{
  date -u
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  timeout 10 "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# The C++ extension is another backend's business; skipping its build keeps this call short.
if ! FUSED_BNLSTM_BUILD_EXTENSION=0 timeout 30 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/install.log" 2>&1; then
  echo "pip install failed (see install.log); running from the source tree instead" | tee -a "$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Triton's compile cache on local disk, shared by the tests and the benchmark.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-fused-bnlstm}"
unset TRITON_INTERPRET

# The test tiers are bound by Triton's compiles (CPU work): spread them over 4 workers where pytest-xdist is
# installed (the GPU image has it), sharing the compile cache above.
XDIST=()
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 4)

tests() {  # tests FILE LIMIT_S LOG
  local file=$1 limit=$2 log=$3
  timeout "$limit" "$PYTHON" -m pytest "$file" -q -rs -p no:cacheprovider "${XDIST[@]}" >"$OUT/$log" 2>&1
  local rc=$?
  echo "pytest $file exit $rc" | tee -a "$OUT/$log"
  tail -n 25 "$OUT/$log"
  [ "$rc" -ne 0 ] && status=1
}
tests tests/test_triton.py 144 pytest.log
tests tests/test_triton_persistent.py 60 pytest_persistent.log
tests tests/test_compile.py::test_cuda_triton_ops_pass_opcheck_and_compile_fullgraph 30 pytest_compile.log

bench() {  # bench PRESET LIMIT_S: one preset under a hard limit, with a soft budget 25 s under it (startup and the row in flight)
  local preset=$1 limit=$2
  timeout "$limit" "$PYTHON" -m benchmarks --preset "$preset" "${BENCH_ARGS[@]}" --device cuda \
    --time-budget "$((limit - 25))" --out "$OUT/bench" >"$OUT/bench_$preset.log" 2>&1
  local rc=$?
  echo "python -m benchmarks --preset $preset exit $rc" | tee -a "$OUT/bench_$preset.log"
  grep -v '^\(json\|csv\|png\): ' "$OUT/bench_$preset.log" >>"$OUT/bench.md"
  tail -n 60 "$OUT/bench_$preset.log"
  [ "$rc" -ne 0 ] && status=1
}
: >"$OUT/bench.md"
bench smnist 95
bench charptb 80
bench generic 80
exit "$status"
