"""The last sums of a layer norm's backward under torch.compile: ATen's column sum (what Inductor's wrapper
calls) against imagegen.inductor_sums.column_sum at each training size's workspace shape.

    python scripts/benchmark.py sums [--out sums.json]     # (GPU)

Each row is the GPU time of one sum: CALLS calls in a row replayed from one CUDA graph, as a training step runs
them (ATen's include the memset each needs), divided by CALLS (by 2 CALLS for column_sums, which sums a layer
norm's two slices in one launch, as training calls it); and its largest difference from the fp64 sum relative to
that sum's largest magnitude.
"""

from __future__ import annotations

import functools

import torch

from imagegen import inductor_sums
from imagegen.benchmark import graph_time_ms
from imagegen.cuda_graph import repeated
from imagegen.train_benchmark import SIZES

# (rows per step, columns per program, warps) of the Triton kernel
SETTINGS = [(inductor_sums.BLOCK_S, inductor_sums.BLOCK_R, inductor_sums.WARPS), (128, 8, 4), (256, 8, 4),
            (512, 8, 4), (2048, 8, 8), (2048, 4, 8), (1024, 4, 4), (512, 16, 8)]
CALLS = 50


def workspace_rows(tokens: int, sms: int) -> int:
    """How many partial sums Inductor's mix-order reduction writes per column for `tokens` rows (its split size:
    tokens // (8 * SMs) rounded down to a power of two, within 16..128)."""
    split = max(16, min(128, 1 << max(0, (tokens // (8 * sms)).bit_length() - 1)))
    return -(-tokens // split)


def bench_sums(quick: bool = False) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for label, V, H, W, C, _, d, heads, batch in (SIZES[:1] if quick else SIZES):
        S = workspace_rows(batch * H * W * C, sms)
        x = torch.randn(S, d, device="cuda")
        ref = x.double().sum(0)
        ways = {"ATen x.sum(dim=0)": functools.partial(x.sum, dim=0)}
        for s in SETTINGS[:2] if quick else SETTINGS:
            ways[f"Triton, {s[0]} rows x {s[1]} columns, {s[2]} warps"] = functools.partial(
                inductor_sums.column_sum, x, *s)
        pair = torch.cat([x.flatten(), x.flatten()])  # a workspace of two slices, as a layer norm's backward writes
        ways["Triton column_sums, both slices in one launch"] = lambda pair=pair, S=S, d=d: inductor_sums.column_sums(
            pair, S, d)
        row = {"size": label, "S": S, "R": d, "ways": {}}
        for name, fn in ways.items():
            sums = fn()
            sums = sums if isinstance(sums, tuple) else (sums,)  # column_sums: one per slice
            err = max(((s.double() - ref).abs().max() / ref.abs().max()).item() for s in sums)
            row["ways"][name] = {"ms": graph_time_ms(repeated(fn, CALLS), quick) / CALLS / len(sums), "err": err}
            print(label, name, row["ways"][name], flush=True)
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sums": rows}


def format_sums(result: dict) -> str:
    out = [(f"A layer norm's final column sum (fp32 workspace, one of {CALLS} calls replayed from a CUDA graph; "
            f"{result['device']}, torch {result['torch']})"),
           "| size | workspace | way | ms | max err / max |sum| |", "|---|---|---|---|---|"]
    for r in result["sums"]:
        for name, got in r["ways"].items():
            out.append(f"| {r['size']} | {r['S']} x {r['R']} | {name} | {got['ms'] * 1e3:.2f} us | {got['err']:.1e} |")
    return "\n".join(out)
