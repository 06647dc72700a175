#!/usr/bin/env bash
# The GPU checks (issue 17) in one go, on a machine with a CUDA GPU: the `cuda`-marked tests, then the GPU benchmark
# (benchmarks/autotune.py --gpu). Logs go to $OUT (default ./gpu-out). Where the project's dependencies are not
# installed, wheels in .whl/ are installed into /tmp/site first (see the device tool's notes).
#   TESTS_S / BENCH_S: time limits in seconds; BUDGET_BERT / BUDGET_CNN: autotune budgets.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v -i "warning" | tail -3
  export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter  # nbconvert's templates are data files
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; python3 -c \
  "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)") \
  2>&1 | tee "$OUT/machine.txt"
timeout "${TESTS_S:-270}" python3 -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider --durations=8 \
  2>&1 | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
timeout "${BENCH_S:-240}" python3 benchmarks/autotune.py --gpu --budget-minilm "${BUDGET_BERT:-60s}" \
  --budget-cnn "${BUDGET_CNN:-30s}" ${BENCH_MODELS:+--models $BENCH_MODELS} 2>&1 | grep -v "^  \[" | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
