"""Dense vs sparse benchmarks; prints markdown tables and writes JSON.

    python scripts/benchmark.py attention [--out attention.json]   # one attention call, fwd+bwd (GPU)
    python scripts/benchmark.py attention --quick                   # seconds on a CPU (no timing claims)
    python scripts/benchmark.py sample [--out sampling.json]         # 64 images x 4096 tokens, 40M model
"""

import argparse

from imagegen import benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "sample"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test on any machine")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.what == "attention":
        result = benchmark.bench_attention(quick=args.quick)
        print(benchmark.format_attention(result))
    else:
        result = benchmark.bench_sampling(quick=args.quick)
        print(benchmark.format_sampling(result))
    benchmark.save(result, args.out)


if __name__ == "__main__":
    main()
