#!/usr/bin/env bash
# The GPU checks and benchmarks of the attention-kernel issue, as one short run on one GPU
# (device time is scarce): the compiled kernel against the reference, the attention benchmark,
# the train step's MFU at Table 2 sizes. Results land in $OUT (default /tmp/gpu_suite).
#
#   bash benchmarks/gpu_suite.sh            # from the repository root, on the GPU machine
#
# Packages the machine lacks can travel as wheels in .whl/ (README, "Tests and benchmarks").
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
run() { echo "== $*" >&2; timeout "${STEP_TIMEOUT:-240}" "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# 1. The compiled Triton kernel against the float32 reference (values and gradients, bf16).
TRANSFUSION_TEST_BACKEND=gpu run python3 -m pytest -q -p no:cacheprovider \
  tests/test_attention_gpu.py 2>&1 | tail -n 5 | tee "$OUT/kernel_tests.txt"

# 2. Attention: Transfusion mask vs causal, each kernel vs blockwise and dense, rows of 4096.
run python3 benchmarks/attention.py --length 4096 --batch 2 --heads 16 --head_dim 64 \
  --steps 10 | tee "$OUT/attention.jsonl"
run python3 benchmarks/attention.py --length 4096 --batch 2 --heads 16 --head_dim 128 \
  --impls blockwise,pallas_gpu,cudnn --steps 10 | tee -a "$OUT/attention.jsonl"

# 3. The trainer's step at Table 2 sizes, bf16, rows of 4096 in the paper's mix.
for spec in "0.76b 8 full" "0.16b 8 none" "1.4b 4 full" "0.76b 4 none"; do
  set -- $spec
  run python3 benchmarks/model_step.py --size "$1" --batch "$2" --remat "$3" --mix paper \
    --length 4096 --attention pallas_gpu --steps 5 | tee -a "$OUT/model_step.jsonl"
done
