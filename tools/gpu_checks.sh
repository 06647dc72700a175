#!/usr/bin/env bash
# The GPU checks (issue 17) in one go, on a machine with a CUDA GPU, logs to $OUT (default ./gpu-out): the
# `cuda`-marked tests and the fast subset of the whole suite (device="auto" picks the GPU there) side by side, then
# the GPU benchmark (benchmarks/autotune.py --gpu) alone, as its timings are quoted. JOBS picks (cuda,suite,bench,
# profile: tools/gpu_profile.py, not in the default).
# Where the project's dependencies are not installed, wheels in .whl/ are installed into /tmp/site first (see the
# device tool's notes); trained built-ins in .gpucache/ seed $WORKBENCH_CACHE so nothing is trained there. Both are
# made here by tools/gpu_wheels.sh; carry both.
#   TESTS_S / BENCH_S / SUITE_S: time limits in seconds; BUDGET_BERT / BUDGET_CNN: autotune budgets (the BERT's
#   150 s: a trial compiles for ~30 s there, and 60 s searched one candidate);
#   CUDA_K: a -k expression for the cuda tests.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v -i "warning" | tail -3
  export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter  # nbconvert's templates are data files
fi
if [ -d .gpucache ]; then
  mkdir -p /tmp/wbcache && cp -r .gpucache/. /tmp/wbcache/ && export WORKBENCH_CACHE=/tmp/wbcache
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; nproc; python3 -c \
  "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
 python3 -c "import torchao; print('torchao', torchao.__version__)") 2>&1 | tee "$OUT/machine.txt"
# the built-ins, loaded (or trained) once before the jobs start: seven processes training at once on 16 threads
# each took over 200 s
python3 -c "import workbench as wb; [wb.zoo.load(n) for n in ('digits-mlp', 'digits-cnn')]" 2>&1 | tail -2
JOBS=${JOBS:-cuda,suite,bench}
# pytest-timeout and pytest-xdist (the GPU image has both): per-test limits and workers only where installed
TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 200")
WORKERS=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${SUITE_N:-6}")
pids=()
if [[ $JOBS == *cuda* ]]; then
  (timeout "${TESTS_S:-300}" python3 -m pytest tests/test_cuda.py -m cuda -q -rA -p no:cacheprovider $TIMEOUT \
    --tb=short --durations=30 ${CUDA_K:+-k "$CUDA_K"} > "$OUT/tests.log" 2>&1; echo "tests exit: $?" >> "$OUT/tests.log") &
  pids+=($!)
fi
if [[ $JOBS == *suite* && ${SUITE_S:-400} != 0 ]]; then
  (OMP_NUM_THREADS=2 timeout "${SUITE_S:-400}" python3 -m pytest tests -m "not slow and not cuda" -q \
    -p no:cacheprovider $WORKERS --continue-on-collection-errors $TIMEOUT --tb=short > "$OUT/suite.log" 2>&1; echo "suite exit: $?" >> "$OUT/suite.log") &
  pids+=($!)
fi
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
if [[ $JOBS == *bench* ]]; then  # alone: its timings are quoted
  (timeout "${BENCH_S:-400}" python3 benchmarks/autotune.py --gpu --threads 4 --budget-minilm "${BUDGET_BERT:-150s}" \
    --budget-cnn "${BUDGET_CNN:-30s}" ${BENCH_MODELS:+--models $BENCH_MODELS} > "$OUT/bench.log" 2>&1
   echo "bench exit: $?" >> "$OUT/bench.log")
fi

if [[ $JOBS == *profile* ]]; then  # alone too: where the BERT's GPU time goes (tools/gpu_profile.py)
  (timeout "${PROFILE_S:-240}" python3 tools/gpu_profile.py > "$OUT/profile.log" 2>&1
   echo "profile exit: $?" >> "$OUT/profile.log")
fi

tail -n 3 "$OUT"/*.log
