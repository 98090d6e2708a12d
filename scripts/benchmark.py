"""Dense vs sparse benchmarks; prints markdown tables and writes JSON.

    python scripts/benchmark.py attention [--out attention.json]   # one attention call, fwd+bwd (GPU)
    python scripts/benchmark.py sample [--out sampling.json]         # 64 images x 4096 tokens, 40M model
    python scripts/benchmark.py train --anchor ../shared/anchors/model_bench.py [--sizes 0 1 2] [--out train.json]
                                                                     # training step: ours vs the anchor GPT
    python scripts/benchmark.py largest [--out largest.json]        # largest ImageNet-64 batch that trains (GPU)
    python scripts/benchmark.py profile [--model sparse] [--sizes 0]  # where one training step's GPU time goes
    (train and profile: --residual-dtypes float32 autocast also times the bf16 residual stream,
     --mlp-backends torch cublaslt the MLP with its forward GELU in a cuBLASLt GEMM epilogue)
    python scripts/benchmark.py mlp [--out mlp.json]                # the MLP alone, fwd+bwd: torch vs cublaslt MLP (GPU)
    python scripts/benchmark.py tune [--sizes 0 1] [--out tuning.json]  # launch settings of our Triton kernels (GPU)
    python scripts/benchmark.py calls [--out calls.json]           # one attention call: eager, graph, host, kernels (GPU)
    python scripts/benchmark.py gemms [--sizes 0]                   # a step's GEMMs: torch.mm vs cuBLASLt's best (GPU)
    python scripts/benchmark.py dgelu [--out dgelu.json]           # the MLP's dgrad GEMM + gelu': cuBLAS vs fused (GPU)
    python scripts/benchmark.py {attention,sample,train} --quick    # seconds on a CPU (no timing claims)
"""

import argparse

import torch

from imagegen import benchmark, train_benchmark
from imagegen.model import MLP_BACKENDS, RESIDUAL_DTYPES


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "sample", "train", "largest", "profile", "tune", "calls",
                                           "mlp", "gemms", "dgelu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test on any machine")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--anchor", help="train: the anchor's model_bench.py, timed in the same process")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="train: which of the sizes to run (0, 1, 2); profile, gemms: the first; tune: which "
                             "attention-table shapes (0: N=4096 x 16, 1: N=12288 x 4)")
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
    if args.what in ("largest", "tune", "calls", "mlp", "gemms", "dgelu") and not torch.cuda.is_available():
        parser.error(f"'{args.what}' measures CUDA kernels and needs a GPU")
    if args.what == "tune":
        from imagegen import kernel_tuning

        result = kernel_tuning.tune(shapes=args.sizes)
        print(kernel_tuning.format_tuning(result))
    elif args.what == "calls":
        result = benchmark.bench_call_costs()
        print(benchmark.format_call_costs(result))
    elif args.what == "attention":
        result = benchmark.bench_attention(quick=args.quick)
        print(benchmark.format_attention(result))
    elif args.what == "sample":
        result = benchmark.bench_sampling(quick=args.quick)
        print(benchmark.format_sampling(result))
    elif args.what == "profile":
        result = train_benchmark.profile_step(args.model, (args.sizes or [0])[0], quick=args.quick,
                                              residual_dtype=args.residual_dtypes[0], mlp_backend=args.mlp_backends[0],
                                              compile_mode=args.compile_modes[0])
        print(train_benchmark.format_profile(result))
    elif args.what == "gemms":
        from imagegen import gemm_survey

        result = gemm_survey.bench_gemms((args.sizes or [0])[0])
        print(gemm_survey.format_gemms(result))
    elif args.what == "dgelu":
        from imagegen import dgelu_survey

        result = dgelu_survey.bench_dgelu()
        print(dgelu_survey.format_dgelu(result))
    elif args.what == "mlp":
        result = train_benchmark.bench_mlp(quick=args.quick)
        print(train_benchmark.format_mlp(result))
    elif args.what == "largest":
        result = train_benchmark.bench_largest()
        print(train_benchmark.format_largest(result))
    else:
        result = train_benchmark.bench_train(quick=args.quick, anchor_path=args.anchor, sizes=args.sizes,
                                             compile_modes=tuple(args.compile_modes),
                                             residual_dtypes=tuple(args.residual_dtypes),
                                             models=tuple(args.models), mlp_backends=tuple(args.mlp_backends),
                                             inductor=tuple(args.inductor))
        print(train_benchmark.format_train(result))
    benchmark.save(result, args.out)


if __name__ == "__main__":
    main()
