"""Compare training runs from their local records (no wandb account needed).

    python scripts/compare.py RUN_DIR [RUN_DIR ...] [--out compare.png]
    python scripts/compare.py multirun/DATE/TIME --out dense_vs_sparse.png    # every job of a sweep

Prints a markdown table, the runs read at the same step and at the same second, and writes a PNG of
the validation metric and the training loss against tokens and wall-clock.
"""

import argparse

from imagegen.compare import format_table, head_to_head, plot, run_dirs, summarize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs (or sweep dirs holding them)")
    parser.add_argument("--out", default="compare.png", help="the plot (PNG)")
    args = parser.parse_args()
    try:
        summaries = [summarize(d) for d in run_dirs(args.runs)]
    except FileNotFoundError as e:
        parser.exit(2, f"compare.py: {e}\n")
    print(format_table(summaries))
    same_budget = head_to_head(summaries)
    if same_budget:
        print("\n" + same_budget)
    print(f"wrote {plot(summaries, args.out)}")


if __name__ == "__main__":
    main()
