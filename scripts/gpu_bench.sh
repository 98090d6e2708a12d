#!/usr/bin/env bash
# The GPU tables of the README, each stage measured beside its anchor in the same call (device tool):
#   OUT=gpu_out bash scripts/gpu_bench.sh attention sample train tests
# attention: scripts/benchmark.py attention (one call fwd+bwd, dense FlashAttention vs our backends)
# sample:    the anchor samplers (ANCHORS/sample_bench.py), then scripts/benchmark.py sample
# train:     scripts/benchmark.py train with the anchor GPT (ANCHORS/model_bench.py) in the same process
#            (TRAIN_SIZES picks the sizes, default "0 1 2")
#            (TRAIN_MODES: torch.compile modes of our models, default "default"; TRAIN_RESIDUALS: residual-stream
#            dtypes, default "float32", e.g. "float32 autocast"; TRAIN_MODELS: which of ours, default "dense sparse";
#            TRAIN_MLPS: model.mlp_backend values, default "torch", e.g. "torch cublaslt"; TRAIN_INDUCTOR:
#            torch._inductor.config settings, one row each, e.g. "none triton.mix_order_reduction_split_size=64";
#            TRAIN_TIMEOUT seconds)
# tune:      scripts/benchmark.py tune: launch settings of our Triton attention kernels, beside `auto`
#            (TUNE_SIZES: which attention-table shapes, default both: "0 1")
# calls:     scripts/benchmark.py calls: one attention call's eager, CUDA-graph and host time, and its kernels
# profile:   scripts/benchmark.py profile for model=sparse at PROFILE_SIZES (default "0 1"): kernel time by group
#            (PROFILE_RESIDUAL: the residual-stream dtype, default float32; PROFILE_MLP: model.mlp_backend;
#            PROFILE_MODE: the torch.compile mode, default "default", e.g. reduce-overhead for CUDA graphs;
#            PROFILE_TRACE=1: also trace_SIZE.json.gz, the profiled steps as a Chrome trace)
# mlp:       scripts/benchmark.py mlp: the MLP alone, forward + backward, unfused vs its forward GELU in a cuBLASLt epilogue
# dgelu:     scripts/benchmark.py dgelu: the MLP's dgrad GEMM with gelu', cuBLAS + elementwise vs imagegen.dgelu_matmul
# sums:      scripts/benchmark.py sums: a layer norm's final column sums, ATen vs imagegen.inductor_sums
# blas:      the train rows (TRAIN_* as above; default size 0, sparse, fused MLP, autocast residual, reduce-overhead)
#            once per cuBLAS environment in BLAS_ENVS, ';'-separated (default "none;TORCH_BLAS_PREFER_CUBLASLT=1"),
#            each in its own process with its own anchor row
# gemms:     scripts/benchmark.py gemms at GEMM_SIZES (default "0 1"): each GEMM of a training step, torch.mm against
#            the fastest of cuBLASLt's heuristic candidates
# largest:   scripts/benchmark.py largest: the largest batch of the 48-layer ImageNet 64x64 model that trains, dense
#            and sparse, with and without activation checkpointing (LARGEST_MAX_BATCH, default 128;
#            LARGEST_MEMORY_GIB: cap the allocator, e.g. 79 for an 80 GB card's memory on a larger one)
# tests:     the gpu-marked tests (bf16 exactness of every backend, CUDA-graph decoding, compiled model;
#            TEST_K: a pytest -k expression to run some of them)
# runs:      scripts/train.py itself (model=RUN_MODEL, default sparse, RUN_STEPS steps, default 400), once per
#            RUN_VARIANTS entry (overrides joined by commas; default: compile_mode=default, compile_mode=reduce-overhead,
#            model.residual_dtype=autocast), then compare.py: a real run's tokens/s and validation side by side
#            (RUN_ARGS adds overrides to each; more than 8 files come out, so PACK=1 on the device tool)
# (DDP_ARGS and EMOJI_ARGS add overrides, e.g. a tiny CPU check of the stages themselves)
# ddp:       model=sparse on 1 GPU, then DDP on 2 GPUs (DDP_STEPS steps each), compared (2-GPU machine)
# fsdp:      trainer=fsdp on every GPU of the machine (FSDP_STEPS steps, default 100), then resumed from its last
#            checkpoint for 50 more; logs, metrics, curves.png and the checkpoints and wandb runs it left in $OUT/fsdp*
#            (FSDP_ARGS adds overrides)
# emoji:     experiment=emoji for each of EMOJI_MODELS (default "dense sparse"; EMOJI_DIR=the 64x64 PNGs,
#            EMOJI_TIME=trainer.max_time), at the same time on one GPU each when the machine has enough
#            (else one after the other), then 16 samples from each last checkpoint; each run's records
#            (metrics.csv, run.json, samples.png) go to $OUT/emoji_<model>, compare.py's to $OUT/emoji.*;
#            on the device tool keep EMOJI_TIME about 70 s under the call's limit (start-up, dense sampling)
# GPU_SAMPLE=1 writes $OUT/gpu_samples.csv: the SM clock, power draw and throttle reasons every 100 ms.
# ANCHORS defaults to ../shared/anchors (copy them into the repo as .anchors/ for the device tool).
# The device machine has no network: for the emoji stage copy the PNGs into the repo first, e.g.
#   cp -r ~/data/node_modules/emoji-datasource-twitter/img/twitter/64 .data/emoji64   (git-ignored, 18 MB)
# and carry .data with the call (EMOJI_DIR=.data/emoji64).
set -uo pipefail
OUT=${OUT:-gpu_out}; ANCHORS=${ANCHORS:-../shared/anchors}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/card.txt"
# One emoji job: train for EMOJI_TIME, sample 16 images from its last checkpoint, copy its records to $OUT.
emoji_job() {
  local model=$1 run=/tmp/emoji_$1
  python scripts/train.py experiment=emoji model="$model" data.path="$EMOJI_DIR" \
    trainer.max_time="${EMOJI_TIME:-00:00:08:00}" hydra.run.dir="$run" ${EMOJI_ARGS:-} > "$OUT/emoji_$model.log" 2>&1
  echo "emoji $model (GPU $CUDA_VISIBLE_DEVICES): exit $?"
  mkdir -p "$OUT/emoji_$model"   # the records first: sampling 12,288-token images densely takes a minute
  for f in metrics.csv run.json; do [ -e "$run/$f" ] && cp "$run/$f" "$OUT/emoji_$model/"; done
  python scripts/sample.py ckpt_path="$run/checkpoints/last.ckpt" num_samples=16 out="$OUT/emoji_$model/samples.png" \
    > "$OUT/emoji_${model}_sample.log" 2>&1; echo "emoji $model sample: exit $?"
  rm -rf "$OUT/emoji_$model/samples"   # keep the grid; the single images would pass the device tool's file limit
}
if [ -n "${GPU_SAMPLE:-}" ]; then   # the card's SM clock, power and throttle reasons every 100 ms, beside the stages
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 100 > "$OUT/gpu_samples.csv" 2>&1 &
  sampler=$!; trap 'kill $sampler 2>/dev/null' EXIT
fi
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    attention) python scripts/benchmark.py attention --out "$OUT/attention.json" | tee "$OUT/attention.md" ;;
    sample) python "$ANCHORS/sample_bench.py" 2>&1 | tee "$OUT/anchor_sample.txt"
            python scripts/benchmark.py sample --out "$OUT/sampling.json" | tee "$OUT/sampling.md" ;;
    train) timeout "${TRAIN_TIMEOUT:-3600}" python scripts/benchmark.py train --anchor "$ANCHORS/model_bench.py" \
             --sizes ${TRAIN_SIZES:-0 1 2} --compile-modes ${TRAIN_MODES:-default} \
             --residual-dtypes ${TRAIN_RESIDUALS:-float32} --models ${TRAIN_MODELS:-dense sparse} \
             --mlp-backends ${TRAIN_MLPS:-torch} ${TRAIN_INDUCTOR:+--inductor $TRAIN_INDUCTOR} \
             --out "$OUT/train.json" > "$OUT/train.log" 2>&1; echo "exit $?"
           grep -v "^{" "$OUT/train.log" | tail -n 20 | tee "$OUT/train.md" ;;
    blas) IFS=';' read -ra envs <<< "${BLAS_ENVS:-none;TORCH_BLAS_PREFER_CUBLASLT=1}"; i=0
          for e in "${envs[@]}"; do   # one process per cuBLAS environment, each timing the anchor beside ours
            [ "$e" = none ] && e=""
            env $e python scripts/benchmark.py train --anchor "$ANCHORS/model_bench.py" --sizes ${TRAIN_SIZES:-0} \
              --compile-modes ${TRAIN_MODES:-reduce-overhead} --residual-dtypes ${TRAIN_RESIDUALS:-autocast} \
              --models ${TRAIN_MODELS:-sparse} --mlp-backends ${TRAIN_MLPS:-fused} --out "$OUT/blas_$i.json" \
              > /tmp/blas_$i.log 2>&1; echo "environment '${e:-none}': exit $?" | tee -a "$OUT/blas.md"
            grep "^|" /tmp/blas_$i.log | tee -a "$OUT/blas.md"; i=$((i + 1))
          done ;;
    dgelu) python scripts/benchmark.py dgelu --out "$OUT/dgelu.json" | tee "$OUT/dgelu.md" ;;
    sums) python scripts/benchmark.py sums --out "$OUT/sums.json" | tee "$OUT/sums.md" ;;
    mlp) python scripts/benchmark.py mlp --out "$OUT/mlp.json" | tee "$OUT/mlp.md" ;;
    gemms) for size in ${GEMM_SIZES:-0 1}; do   # a step's GEMMs: torch.mm against cuBLASLt's fastest candidate
             python scripts/benchmark.py gemms --sizes "$size" --out "$OUT/gemms_$size.json" | tee "$OUT/gemms_$size.md"
           done ;;
    calls) python scripts/benchmark.py calls --out "$OUT/calls.json" | tee "$OUT/calls.md" ;;
    tune) python scripts/benchmark.py tune ${TUNE_SIZES:+--sizes $TUNE_SIZES} --out "$OUT/tuning.json" | tee "$OUT/tuning.md" ;;
    profile) for size in ${PROFILE_SIZES:-0 1}; do   # where a sparse training step's kernel time goes
               python scripts/benchmark.py profile --model sparse --sizes "$size" \
                 --residual-dtypes "${PROFILE_RESIDUAL:-float32}" --mlp-backends "${PROFILE_MLP:-torch}" \
                 --compile-modes "${PROFILE_MODE:-default}" \
                 --out "$OUT/profile_$size.json" ${PROFILE_TRACE:+--trace "$OUT/trace_$size.json.gz"} \
                 2>&1 | grep -v "^STAGE:\|USDT" | tee "$OUT/profile_$size.md"; done ;;
    largest) timeout "${LARGEST_TIMEOUT:-3600}" python scripts/benchmark.py largest --max-batch "${LARGEST_MAX_BATCH:-128}" \
               ${LARGEST_MEMORY_GIB:+--memory-gib $LARGEST_MEMORY_GIB} --out "$OUT/largest.json" \
               > "$OUT/largest.log" 2>&1; echo "exit $?"
             grep -v "^{" "$OUT/largest.log" | tail -n 12 | tee "$OUT/largest.md" ;;
    tests) timeout "${TEST_TIMEOUT:-900}" python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py \
             ${TEST_K:+-k "$TEST_K"} > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"
           grep -E "bf16|passed|failed|Error|assert" "$OUT/gpu_tests.log" | tail -n 60 ;;
    runs) export WANDB_MODE=offline; dirs=""
          for variant in ${RUN_VARIANTS:-compile_mode=default compile_mode=reduce-overhead model.residual_dtype=autocast}; do
            name=run_$(echo "$variant" | tr -c 'a-zA-Z0-9\n' '_'); dir=/tmp/$name
            python scripts/train.py model=${RUN_MODEL:-sparse} trainer.max_steps=${RUN_STEPS:-400} \
              trainer.val_check_interval=${RUN_STEPS:-400} callbacks.sample_grid.every_n_steps=0 \
              ${variant//,/ } hydra.run.dir=$dir ${RUN_ARGS:-} > "$OUT/$name.log" 2>&1; echo "$variant: exit $?"
            mkdir -p "$OUT/$name"; cp $dir/metrics.csv $dir/run.json "$OUT/$name/"; dirs="$dirs $dir"
          done
          python scripts/compare.py $dirs --out "$OUT/runs.png" | tee "$OUT/runs.md" ;;
    ddp) export WANDB_MODE=offline
         for n in 1 2; do
           python scripts/train.py trainer=ddp trainer.devices=$n model=sparse trainer.max_steps=${DDP_STEPS:-300} \
             trainer.val_check_interval=${DDP_STEPS:-300} callbacks.sample_grid.every_n_steps=0 \
             hydra.run.dir=/tmp/ddp_$n ${DDP_ARGS:-} > "$OUT/ddp_$n.log" 2>&1; echo "ddp on $n GPU(s): exit $?"
           echo "run dirs: $(ls -d /tmp/ddp_$n | wc -l), wandb runs: $(ls -d /tmp/ddp_$n/wandb/offline-run-* | wc -l)"
           mkdir -p "$OUT/ddp_$n"; cp /tmp/ddp_$n/metrics.csv /tmp/ddp_$n/run.json "$OUT/ddp_$n/"
         done
         python scripts/compare.py /tmp/ddp_1 /tmp/ddp_2 --out "$OUT/ddp.png" | tee "$OUT/ddp.md" ;;
    fsdp) export WANDB_MODE=offline; gpus=$(nvidia-smi -L | wc -l); steps=${FSDP_STEPS:-100}; dir=/tmp/fsdp_run
          common="trainer=fsdp trainer.devices=$gpus model=sparse callbacks.sample_grid.every_n_steps=0 hydra.run.dir=$dir"
          python scripts/train.py $common trainer.max_steps=$steps trainer.val_check_interval=$steps ${FSDP_ARGS:-} \
            > "$OUT/fsdp.log" 2>&1; echo "fsdp on $gpus GPU(s): exit $?"
          python scripts/train.py $common trainer.max_steps=$((steps + 50)) trainer.val_check_interval=$steps \
            ckpt_path=$dir/checkpoints/last.ckpt ${FSDP_ARGS:-} > "$OUT/fsdp_resume.log" 2>&1; echo "resumed: exit $?"
          mkdir -p "$OUT/fsdp"; cp $dir/metrics.csv $dir/run.json $dir/curves.png "$OUT/fsdp/"
          (ls -la $dir/checkpoints; ls -d $dir/wandb/offline-run-*) > "$OUT/fsdp/files.txt"
          tail -n 3 "$OUT/fsdp.log" "$OUT/fsdp_resume.log"; python scripts/compare.py $dir --out "$OUT/fsdp/fsdp.png" ;;
    emoji) export WANDB_MODE=offline; models=${EMOJI_MODELS:-dense sparse}; gpus=$(nvidia-smi -L | wc -l); i=0
           for model in $models; do   # one GPU a model when there are enough, so both see the same budget at once
             if [ "$gpus" -ge "$(echo $models | wc -w)" ]; then dev=$i; else dev=${CUDA_VISIBLE_DEVICES:-0}; fi
             CUDA_VISIBLE_DEVICES=$dev emoji_job "$model" &
             [ "$gpus" -ge "$(echo $models | wc -w)" ] || wait; i=$((i + 1))
           done; wait
           python scripts/compare.py $(for m in $models; do echo /tmp/emoji_$m; done) --out "$OUT/emoji.png" \
             | tee "$OUT/emoji.md" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "stage $stage took $(( $(date +%s) - start )) s"
done
# The device tool brings back at most 8 files: PACK=1 packs everything under $OUT into $OUT/results.tgz.
if [ "${PACK:-0}" = 1 ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
