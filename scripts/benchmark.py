"""Dense vs sparse benchmarks; prints markdown tables and writes JSON.

    python scripts/benchmark.py attention [--out attention.json]   # one attention call, fwd+bwd (GPU)
    python scripts/benchmark.py sample [--out sampling.json]         # 64 images x 4096 tokens, 40M model
    python scripts/benchmark.py train --anchor ../shared/anchors/model_bench.py [--sizes 0 1 2] [--out train.json]
                                                                     # training step: ours vs the anchor GPT
    python scripts/benchmark.py largest [--out largest.json]        # largest ImageNet-64 batch that trains (GPU)
    python scripts/benchmark.py largest --memory-gib 79             # ... within 79 GiB of a larger card (an 80 GB one's)
    python scripts/benchmark.py profile [--model sparse] [--sizes 0]  # where one training step's GPU time goes
    (train and profile: --residual-dtypes float32 autocast also times the bf16 residual stream,
     --mlp-backends torch cublaslt the MLP with its forward GELU in a cuBLASLt GEMM epilogue)
    python scripts/benchmark.py mlp [--out mlp.json]                # the MLP alone, fwd+bwd: torch vs cublaslt MLP (GPU)
    python scripts/benchmark.py tune [--sizes 0 1] [--out tuning.json]  # launch settings of our Triton kernels (GPU)
    python scripts/benchmark.py calls [--out calls.json]           # one attention call: eager, graph, host, kernels (GPU)
    python scripts/benchmark.py gemms [--sizes 0]                   # a step's GEMMs: torch.mm vs cuBLASLt's best (GPU)
    python scripts/benchmark.py dgelu [--out dgelu.json]           # the MLP's dgrad GEMM + gelu': cuBLAS vs fused (GPU)
    python scripts/benchmark.py sums [--out sums.json]             # a layer norm's final sums: ATen vs ours (GPU)
    python scripts/benchmark.py {attention,sample,train} --quick    # seconds on a CPU (no timing claims)
"""

import argparse

import torch

from imagegen import benchmark, dgelu_survey, gemm_survey, kernel_tuning, sums_survey, train_benchmark
from imagegen.model import MLP_BACKENDS, RESIDUAL_DTYPES


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "sample", "train", "largest", "profile", "tune", "calls",
                                           "mlp", "gemms", "dgelu", "sums"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test on any machine")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--trace",
                        help="profile: also write the profiled steps as a Chrome trace here (.json or .json.gz)")
    parser.add_argument("--anchor", help="train: the anchor's model_bench.py, timed in the same process")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="train: which of the sizes to run (0, 1, 2); profile, gemms: the first; tune: which "
                             "attention-table shapes (0: N=4096 x 16, 1: N=12288 x 4)")
    parser.add_argument("--memory-gib", type=float,
                        help="largest: let PyTorch's allocator hold at most this many GiB (a smaller card's memory)")
    parser.add_argument("--max-batch", type=int, default=128, help="largest: the largest batch to try")
    parser.add_argument("--model", default="sparse", choices=["dense", "sparse"], help="profile: which model")
    parser.add_argument("--models", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"],
                        help="train: which of our models to time beside the anchor")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        help="train: torch.compile modes to time our models with (e.g. default max-autotune-no-cudagraphs); "
                             "profile: the first")
    parser.add_argument("--residual-dtypes", nargs="+", default=["float32"], choices=list(RESIDUAL_DTYPES),
                        help="train: residual-stream dtypes to time our models with; profile: the first")
    parser.add_argument("--mlp-backends", nargs="+", default=["torch"], choices=list(MLP_BACKENDS),
                        help="train: MLP backends (model.mlp_backend) to time our models with; profile: the first")
    parser.add_argument("--inductor", nargs="+", default=[""], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="train: torch._inductor.config settings to time our models with, one row each "
                             "('none': Inductor's defaults; e.g. none triton.mix_order_reduction_split_size=64)")
    args = parser.parse_args()
    for settings in args.inductor:  # an unknown setting fails here, before anything is timed
        try:
            train_benchmark.inductor_settings(settings)
        except ValueError as e:
            parser.error(str(e))
    sizes = train_benchmark.QUICK_SIZES if args.quick else train_benchmark.SIZES  # the table the run indexes
    shapes = {"train": len(sizes), "profile": len(sizes), "gemms": len(train_benchmark.SIZES),
              "tune": len(benchmark.ATTENTION_SHAPES)}
    if args.sizes and args.what in shapes and not all(0 <= i < shapes[args.what] for i in args.sizes):
        parser.error(f"--sizes for {args.what} are 0 to {shapes[args.what] - 1}, got {args.sizes}")
    if args.what == "largest" and (args.max_batch < 1 or (args.memory_gib is not None and args.memory_gib <= 0)):
        parser.error("largest: --max-batch must be at least 1 and --memory-gib positive")
    if args.what in ("largest", "tune", "calls", "mlp", "gemms", "dgelu", "sums") and not torch.cuda.is_available():
        parser.error(f"'{args.what}' measures CUDA kernels and needs a GPU")
    first_size = (args.sizes or [0])[0]
    runs = {  # what -> (run it, format its result)
        "attention": (lambda: benchmark.bench_attention(quick=args.quick), benchmark.format_attention),
        "sample": (lambda: benchmark.bench_sampling(quick=args.quick), benchmark.format_sampling),
        "calls": (benchmark.bench_call_costs, benchmark.format_call_costs),
        "tune": (lambda: kernel_tuning.tune(shapes=args.sizes), kernel_tuning.format_tuning),
        "profile": (lambda: train_benchmark.profile_step(
            args.model, first_size, quick=args.quick, residual_dtype=args.residual_dtypes[0],
            mlp_backend=args.mlp_backends[0], compile_mode=args.compile_modes[0], trace=args.trace),
            train_benchmark.format_profile),
        "gemms": (lambda: gemm_survey.bench_gemms(first_size), gemm_survey.format_gemms),
        "dgelu": (dgelu_survey.bench_dgelu, dgelu_survey.format_dgelu),
        "sums": (sums_survey.bench_sums, sums_survey.format_sums),
        "mlp": (lambda: train_benchmark.bench_mlp(quick=args.quick), train_benchmark.format_mlp),
        "largest": (lambda: train_benchmark.bench_largest(args.max_batch, args.memory_gib),
                    train_benchmark.format_largest),
        "train": (lambda: train_benchmark.bench_train(
            quick=args.quick, anchor_path=args.anchor, sizes=args.sizes, compile_modes=tuple(args.compile_modes),
            residual_dtypes=tuple(args.residual_dtypes), models=tuple(args.models),
            mlp_backends=tuple(args.mlp_backends), inductor=tuple(args.inductor)), train_benchmark.format_train),
    }
    run, format_result = runs[args.what]
    result = run()
    print(format_result(result))
    benchmark.save(result, args.out)


if __name__ == "__main__":
    main()
