"""Launch settings of our Triton attention kernels, timed on the GPU (`scripts/benchmark.py tune`).

For the band kernel of `local` (imagegen.band_attention) it searches each of its kernels in turn (forward,
then dk/dv and dq, or the one-pass backward where the window fits one tile) over tile shapes, strip lengths,
warps and pipeline stages, keeping the best so far for the others (coordinate descent); for the
short-sequence kernel of `column` (imagegen.short_attention) it tries the warps of its forward and backward
kernel. Every time is one attention call, forward + backward, on the
shapes of the attention table, replayed as a CUDA graph (GPU time: an eager call of these kernels is
bound by the host), next to what `auto` runs today on the same shapes. The settings found
are printed, not applied: the defaults in those modules are edited by hand from a run's output.
"""

from __future__ import annotations

import itertools

import torch

from imagegen import band_attention, short_attention
from imagegen.attention import Grid
from imagegen.benchmark import ATTENTION_SHAPES, attention_call, graph_time_ms

# (the fifth field, where present: registers per thread; 168 fits 3 programs of 4 warps on an SM, 128 fits 4)
BAND_CHOICES = [(bm, bn, warps, stages) for (bm, bn), warps, stages in
                itertools.product([(64, 64), (128, 64), (64, 128), (128, 128)], (4, 8), (2, 3))]
BAND_CHOICES += [(bm, bn, 4, stages, registers) for (bm, bn), stages, registers in
                 itertools.product([(64, 64), (64, 128), (128, 64)], (2, 3), (168, 128))]
STRIP_CHOICES = [(64, strip, warps, stages) for strip, warps, stages in itertools.product((4, 8, 16), (4, 8), (1, 2))]
STRIP_CHOICES += [(64, strip, 4, 2, registers) for strip, registers in itertools.product((4, 8), (168, 128))]
FWD_WARPS = (1, 2, 4, 8)
BWD_WARPS = (2, 4, 8)
FWD_REGISTERS = (0, 64)  # 0: the compiler's choice
BWD_REGISTERS = (0, 128)


def _timed(spec: str, grid: Grid, batch: int, backend: str) -> float | str:
    try:
        # replayed as a CUDA graph: an eager call of these kernels is bound by the host (benchmark.py calls)
        return graph_time_ms(attention_call(spec, grid, batch, backend=backend), quick=True)
    except Exception as e:  # a setting that does not fit (shared memory, registers) is a result
        return f"failed: {type(e).__name__}: {str(e)[:160]}"


def _best(times: dict) -> tuple:
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    return min(ok, key=ok.get)


def _coordinate_descent(launch: dict, options: dict, spec: str, grid: Grid, batch: int, quick: bool) -> dict:
    """Each key of `launch` (a kernel module's LAUNCH) in turn set to each of its options, keeping the
    fastest for the keys after it; `launch` is restored afterwards."""
    saved = dict(launch)
    tried = {}
    try:
        for key, choices in options.items():
            times = {}
            for choice in choices[:2] if quick else choices:
                launch[key] = choice
                times[choice] = _timed(spec, grid, batch, "triton")
            launch[key] = _best(times)
            tried[key] = {str(k): v for k, v in times.items()}
        return {"tried": tried, "best": dict(launch), "best_ms": _timed(spec, grid, batch, "triton")}
    finally:
        launch.update(saved)


def tune_band(grid: Grid, batch: int, quick: bool = False) -> dict:
    options = {kernel: BAND_CHOICES for kernel in ("fwd", "dkdv", "dq")}
    if grid.row_len <= band_attention.LAUNCH["strip"][0]:  # the one-pass backward runs instead of dkdv and dq
        options = {"fwd": BAND_CHOICES, "strip": [(0, 0, 0, 0)] + STRIP_CHOICES}  # (0, ...): the two kernels
    return _coordinate_descent(band_attention.LAUNCH, options, "local", grid, batch, quick)


def tune_short(grid: Grid, batch: int, quick: bool = False) -> dict:
    options = {"fwd_warps": FWD_WARPS, "bwd_warps": BWD_WARPS, "fwd_registers": FWD_REGISTERS,
               "bwd_registers": BWD_REGISTERS}
    return _coordinate_descent(short_attention.LAUNCH, options, "column", grid, batch, quick)


def tune(quick: bool = False, shapes: list[int] | None = None) -> dict:
    """The band and short-sequence kernels tuned on each attention-table shape (or those indexed by `shapes`),
    beside `auto`."""
    rows = []
    for label, grid, batch in [ATTENTION_SHAPES[i] for i in shapes] if shapes else ATTENTION_SHAPES:
        row = {"shape": label, "N": grid.num_tokens, "batch": batch,
               "auto_local": _timed("local", grid, batch, "auto"),
               "auto_column": _timed("column", grid, batch, "auto"),
               "triton_local_default": _timed("local", grid, batch, "triton"),
               "triton_column_default": _timed("column", grid, batch, "triton"),
               "band": tune_band(grid, batch, quick), "short": tune_short(grid, batch, quick)}
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("band", "short")}, flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tuning": rows}


def _ms(value) -> str:
    return f"{value:.3f} ms" if isinstance(value, float) else str(value)[:80]


FIELDS = {"strip": "(BLOCK, tiles per strip, warps, stages[, registers])"}


def format_tuning(result: dict) -> str:
    out = [(f"Triton attention kernels: launch settings (one call fwd+bwd, bf16; {result['device']}, "
            f"torch {result['torch']})"),
           ("| shape | local: auto | band kernel, default | band kernel, tuned | column: auto | "
            "short kernel, default | short kernel, tuned |"), "|---|---|---|---|---|---|---|"]
    for r in result["tuning"]:
        out.append(f"| {r['shape']} N={r['N']} x {r['batch']} | {_ms(r['auto_local'])} | "
                   f"{_ms(r['triton_local_default'])} | {_ms(r['band']['best_ms'])} | {_ms(r['auto_column'])} | "
                   f"{_ms(r['triton_column_default'])} | {_ms(r['short']['best_ms'])} |")
    for r in result["tuning"]:
        out += ["", f"{r['shape']}: band kernel best {r['band']['best']}; short kernel best {r['short']['best']}"]
        for kernel, times in r["band"]["tried"].items():
            ranked = sorted(times.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9)
            fields = FIELDS.get(kernel, "(BLOCK_M, BLOCK_N, warps, stages[, registers])")
            out.append(f"- band {kernel} {fields}: "
                       + ", ".join(f"{k} {_ms(v)}" for k, v in ranked[:6]))
        for key, times in r["short"]["tried"].items():
            out.append(f"- short {key}: " + ", ".join(f"{k} {_ms(v)}" for k, v in times.items()))
    return "\n".join(out)
