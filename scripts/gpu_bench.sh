#!/usr/bin/env bash
# The GPU tables of the README, each stage measured beside its anchor in the same call (device tool):
#   OUT=gpu_out bash scripts/gpu_bench.sh attention sample train tests
# attention: scripts/benchmark.py attention (one call fwd+bwd, dense FlashAttention vs our backends)
# sample:    the anchor samplers (ANCHORS/sample_bench.py), then scripts/benchmark.py sample
# train:     scripts/benchmark.py train with the anchor GPT (ANCHORS/model_bench.py) in the same process
#            (TRAIN_SIZES picks the sizes, default "0 1 2")
# tests:     the gpu-marked tests (bf16 exactness of every backend, CUDA-graph decoding, compiled model)
# ANCHORS defaults to ../shared/anchors (copy them into the repo as .anchors/ for the device tool).
set -uo pipefail
OUT=${OUT:-gpu_out}; ANCHORS=${ANCHORS:-../shared/anchors}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/card.txt"
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    attention) python scripts/benchmark.py attention --out "$OUT/attention.json" | tee "$OUT/attention.md" ;;
    sample) python "$ANCHORS/sample_bench.py" 2>&1 | tee "$OUT/anchor_sample.txt"
            python scripts/benchmark.py sample --out "$OUT/sampling.json" | tee "$OUT/sampling.md" ;;
    train) python scripts/benchmark.py train --anchor "$ANCHORS/model_bench.py" --sizes ${TRAIN_SIZES:-0 1 2} \
             --out "$OUT/train.json" > "$OUT/train.log" 2>&1; echo "exit $?"
           grep -v "^{" "$OUT/train.log" | tail -n 20 | tee "$OUT/train.md" ;;
    tests) timeout "${TEST_TIMEOUT:-900}" python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py \
             > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"
           grep -E "bf16|passed|failed|Error|assert" "$OUT/gpu_tests.log" | tail -n 60 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "stage $stage took $(( $(date +%s) - start )) s"
done
