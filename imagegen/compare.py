"""Summaries of finished runs from their local records (metrics.csv of logger=csv), no account needed.

    python scripts/compare.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import csv
import os


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (train with logger=csv to keep local records)")
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def summarize(run_dir: str) -> dict:
    rows = read_metrics(run_dir)
    val_key = next((k for r in rows for k in r if k.startswith("val/bits_per")), None)
    speeds = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r]
    steady = speeds[len(speeds) // 2 :] or speeds  # later half: compile and warm-up excluded
    vals = [(r["step"], r[val_key]) for r in rows if val_key and val_key in r]
    return {
        "run": run_dir,
        "steps": int(max(r.get("step", 0) for r in rows)) + 1,
        "tokens_seen": max((r.get("perf/tokens_seen", 0) for r in rows), default=0),
        "tokens_per_sec": sum(steady) / len(steady) if steady else float("nan"),
        "peak_mem_gb": max((r.get("perf/peak_mem_gb", 0) for r in rows), default=0),
        "metric": val_key or "-",
        "last_val": vals[-1][1] if vals else float("nan"),
        "best_val": min(v for _, v in vals) if vals else float("nan"),
    }


def format_table(summaries: list[dict]) -> str:
    out = ["| run | steps | tokens seen | tokens/s (steady) | peak mem GiB | metric | last val | best val |",
           "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        out.append(f"| {s['run']} | {s['steps']} | {s['tokens_seen']:,.0f} | {s['tokens_per_sec']:,.0f} | "
                   f"{s['peak_mem_gb']:.2f} | {s['metric']} | {s['last_val']:.4f} | {s['best_val']:.4f} |")
    return "\n".join(out)
