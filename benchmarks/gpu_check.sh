#!/usr/bin/env bash
# One prepared device call for the Triton backend (under 8 minutes, no network needed):
#   1. install the package against the machine's torch (no build isolation, no deps, no extension build),
#   2. compile check + the CUDA test tier of tests/test_triton.py (fp32 with TF32 off, bf16 / fp16),
#   3. time forward and forward+backward of BNLSTM backend="triton" against torch.nn.LSTM (cuDNN, TF32
#      off and on) and the reference at the paper's shapes (benchmarks/gpu_triton_bench.py).
# Everything lands in $OUT (default ./gpu_out): machine.txt, install.log, pytest.log, triton_bench.{json,md}.
# Each phase has its own time limit, so a hang in one still leaves the others' results.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# The C++ extension is another backend's business; skipping its build keeps this call short.
if ! FUSED_BNLSTM_BUILD_EXTENSION=0 timeout 180 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/install.log" 2>&1; then
  echo "pip install failed (see install.log); running from the source tree instead" | tee -a "$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Triton's compile cache on local disk, shared by the tests and the benchmark.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-fused-bnlstm}"
unset TRITON_INTERPRET

timeout 240 "$PYTHON" -m pytest tests/test_triton.py -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1
rc=$?
echo "pytest tests/test_triton.py exit $rc" | tee -a "$OUT/pytest.log"
tail -n 25 "$OUT/pytest.log"
[ "$rc" -ne 0 ] && status=1

timeout 200 "$PYTHON" benchmarks/gpu_triton_bench.py --out "$OUT" --repeats 5 >"$OUT/bench.log" 2>&1
rc=$?
echo "gpu_triton_bench exit $rc" | tee -a "$OUT/bench.log"
tail -n 30 "$OUT/bench.log"
[ "$rc" -ne 0 ] && status=1
exit "$status"
