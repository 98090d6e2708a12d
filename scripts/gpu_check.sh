#!/usr/bin/env bash
# GPU validation, run on a CUDA machine (the device tool): bf16 exactness tests of every backend, the
# attention benchmark, and a few hundred training steps of model=dense and model=sparse on the default
# data, compared side by side. Results go to $OUT (default gpu_out/).
#   OUT=gpu_out bash scripts/gpu_check.sh [steps]
set -uo pipefail
OUT=${OUT:-gpu_out}; STEPS=${1:-300}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/card.txt"
python scripts/benchmark.py attention --out "$OUT/attention.json" | tee "$OUT/attention.md"
for model in dense sparse; do
  python scripts/train.py model=$model logger=csv trainer.max_steps=$STEPS trainer.val_check_interval=$STEPS \
    hydra.run.dir="/tmp/gpu_check/$model" > "$OUT/train_$model.log" 2>&1
  echo "train $model: exit $?"; cp "/tmp/gpu_check/$model/metrics.csv" "$OUT/metrics_$model.csv"
done
python scripts/compare.py /tmp/gpu_check/dense /tmp/gpu_check/sparse --out "$OUT/compare.png" | tee "$OUT/compare.md"
timeout "${TEST_TIMEOUT:-900}" python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
grep -E "bf16|passed|failed|Error" "$OUT/gpu_tests.log" | tail -n 80
