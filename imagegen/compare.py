"""Compare finished runs from their local records, with no wandb account: every training run writes
`<run dir>/metrics.csv` (whatever the logger) and `<run dir>/run.json`.

    python scripts/compare.py RUN_DIR [RUN_DIR ...] [--out compare.png]
    python scripts/compare.py multirun/2026-11-28/10-00-00      # a sweep dir: each of its jobs

Prints a table (params, steps, tokens, wall-clock, tokens/s, best validation metric), the runs read at
the same step and at the same second (which is ahead per step, which per second), and writes a PNG: the
validation metric (top) and the training loss (bottom) against tokens seen and against wall-clock time, one
line per run. The training loss is logged far more often than validations run, so it shows a short run's
course where the validation metric has one point.
"""

from __future__ import annotations

import csv
import json
import os


def with_settings(label: str, compile_mode: str = "default", residual_dtype: str = "float32",
                  mlp_backend: str = "torch") -> str:
    """`label` plus the speed settings that differ from the defaults: `sparse, autocast residual, cublaslt MLP,
    reduce-overhead` (compile_mode off, i.e. not compiled, adds nothing). The run labels here and the
    rows of `scripts/benchmark.py train` both name runs this way."""
    extras = ([f"{residual_dtype} residual"] if residual_dtype != "float32" else []) + \
        ([f"{mlp_backend} MLP"] if mlp_backend != "torch" else []) + \
        ([compile_mode] if compile_mode not in ("default", "off") else [])
    return ", ".join([label] + extras)


def run_dirs(paths: list[str]) -> list[str]:
    """Run dirs in `paths`; a dir without metrics.csv is searched one level down (a sweep dir)."""
    out = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.csv")):
            out.append(path)
            continue
        subdirs = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
        jobs = [d for d in subdirs if os.path.isfile(os.path.join(d, "metrics.csv"))]
        if not jobs:
            raise FileNotFoundError(f"{path}: no metrics.csv here or in its sub-directories (is it a run dir?)")
        out += jobs
    return out


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training run dir?)")
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def read_info(run_dir: str) -> dict:
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through (xs, ys) sorted by xs; clamped at the ends."""
    if not xs:
        return float("nan")
    if x <= xs[0]:
        return ys[0] * (x + 1) / (xs[0] + 1)  # before the first record: proportional from zero
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def metric_curve(rows: list[dict], key: str) -> list[dict]:
    """[{step, tokens, seconds, value}] for each row logging `key` (a validation metric, the training loss),
    with tokens seen and wall-clock at that step."""
    def series(name):
        pts = sorted((r["step"], r[name]) for r in rows if name in r and "step" in r)
        return [p[0] for p in pts], [p[1] for p in pts]

    tok_x, tok_y = series("perf/tokens_seen")
    sec_x, sec_y = series("perf/wall_clock_s")
    return [{"step": r["step"], "tokens": _interp(r["step"], tok_x, tok_y),
             "seconds": _interp(r["step"], sec_x, sec_y), "value": r[key]}
            for r in sorted((r for r in rows if key in r), key=lambda r: r["step"])]


def summarize(run_dir: str) -> dict:
    rows, info = read_metrics(run_dir), read_info(run_dir)
    key = info.get("metric") or next((k for r in rows for k in r if k.startswith("val/bits_per")), None)
    speeds = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r]
    steady = speeds[len(speeds) // 2 :] or speeds  # later half: compile and warm-up excluded
    curve = metric_curve(rows, key) if key else []
    label = "-".join(str(info[k]) for k in ("model", "size", "tokenizer") if k in info) or os.path.basename(run_dir)
    if info.get("devices", 1) > 1:
        label += f" x{info['devices']} devices"
    label = with_settings(label, info.get("compile_mode", "default"), info.get("residual_dtype", "float32"),
                          info.get("mlp_backend", "torch"))
    return {
        "run": run_dir,
        "label": label,
        "params": info.get("params"),
        "steps": int(max(r.get("step", 0) for r in rows)) + 1 if rows else 0,
        "tokens_seen": max((r.get("perf/tokens_seen", 0) for r in rows), default=0),
        "wall_clock_s": max((r.get("perf/wall_clock_s", 0) for r in rows), default=0),
        "tokens_per_sec": sum(steady) / len(steady) if steady else float("nan"),
        "peak_mem_gb": max((r.get("perf/peak_mem_gb", 0) for r in rows), default=0),
        "metric": key or "-",
        "last_val": curve[-1]["value"] if curve else float("nan"),
        "best_val": min(p["value"] for p in curve) if curve else float("nan"),
        "curve": curve,
        "train_curve": metric_curve(rows, "train/loss"),
    }


def format_table(summaries: list[dict]) -> str:
    out = [("| run | params | steps | tokens seen | wall-clock | tokens/s (steady) | peak mem GiB | metric | "
            "best val | last val |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        params = f"{s['params'] / 1e6:.2f}M" if s["params"] else "-"
        out.append(f"| {s['label']} | {params} | {s['steps']} | {s['tokens_seen']:,.0f} | "
                   f"{s['wall_clock_s']:.0f} s | {s['tokens_per_sec']:,.0f} | {s['peak_mem_gb']:.2f} | "
                   f"{s['metric']} | {s['best_val']:.4f} | {s['last_val']:.4f} |")
    return "\n".join(out)


def _at(curve: list[dict], x: str, where: float) -> float:
    """The validation metric interpolated at `where` on axis `x` (step or seconds); nan outside the run."""
    pts = [(p[x], p["value"]) for p in curve]
    if not pts or not pts[0][0] <= where <= pts[-1][0]:
        return float("nan")
    return _interp(where, [p[0] for p in pts], [p[1] for p in pts])


def head_to_head(summaries: list[dict]) -> str:
    """The runs read at the same step and at the same wall-clock second (the shortest run's last
    validation on each axis), and which is lowest on each: per step and per second."""
    runs = [s for s in summaries if s["curve"]]
    if len(runs) < 2:
        return ""
    step = min(s["curve"][-1]["step"] for s in runs)
    seconds = min(s["curve"][-1]["seconds"] for s in runs)
    at_step = {s["label"]: _at(s["curve"], "step", step) for s in runs}
    at_time = {s["label"]: _at(s["curve"], "seconds", seconds) for s in runs}
    out = [f"| run | {runs[0]['metric']} at step {step:.0f} | at {seconds:.0f} s |", "|---|---|---|"]
    out += [f"| {label} | {at_step[label]:.4f} | {at_time[label]:.4f} |" for label in at_step]
    for axis, values in (("per step", at_step), ("per second", at_time)):
        known = {k: v for k, v in values.items() if v == v}  # nan: the run has no validation that early
        if len(known) >= 2:
            best = min(known, key=known.get)
            out.append(f"- {axis}: {best} is lowest ({', '.join(f'{k} {v:.4f}' for k, v in known.items())})")
        else:
            late = [k for k, v in values.items() if v != v]
            out.append(f"- {axis}: no common point: {', '.join(late)} had no validation yet at "
                       f"{step if axis == 'per step' else seconds:.0f}{'' if axis == 'per step' else ' s'}, "
                       "where the shortest run ended")
    out.append("(each run's validation curve, interpolated linearly between its validations)")
    return "\n".join(out)


def plot(summaries: list[dict], path: str) -> str:
    """The validation metric (top row) and the training loss (bottom row) against tokens seen (left) and
    wall-clock seconds (right), one colour per run, the legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", sharey="row")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        colour = colours[i % len(colours)]
        for row, (curve, marker) in enumerate(((s["curve"], "o"), (s["train_curve"], None))):
            for ax, x in zip(axes[row], ("tokens", "seconds")):
                ax.plot([p[x] for p in curve], [p["value"] for p in curve], color=colour, marker=marker,
                        markersize=4, linewidth=1.2, label=s["label"] if row == 0 and x == "tokens" else None)
    axes[0][0].set_ylabel(" / ".join(sorted({s["metric"] for s in summaries})) + " (validation)")
    axes[1][0].set_ylabel("train/loss (nats per token)")
    axes[1][0].set_xlabel("tokens seen")
    axes[1][1].set_xlabel("wall-clock (s, training incl. validation)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=1 if max((len(s["label"]) for s in summaries), default=0) > 40 else 2,
               frameon=False)
    fig.suptitle("validation metric and training loss: per token and per second")
    fig.tight_layout(rect=(0, 0.04 + 0.03 * len(summaries), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
