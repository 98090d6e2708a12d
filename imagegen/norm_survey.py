"""The layer-norm backward with the residual add's gradient: Inductor's kernels against imagegen.add_layer_norm's,
at each training size's shape.

    python scripts/benchmark.py norm [--out norm.json]     # (GPU)

Each row is the GPU time of one call replayed from a CUDA graph (no launch overhead): ds = ds_next + LN'(dy),
dgamma and dbeta from bf16 dy, s, ds_next, as a training step's backward computes them per norm; the memory
it moves (dy, s, ds_next read, ds written) over that time; and the error against fp64.
"""

from __future__ import annotations

import functools

import torch

from imagegen import add_layer_norm as aln
from imagegen.benchmark import graph_time_ms
from imagegen.train_benchmark import SIZES


def _inductor_backward(dy, s, ds_next, mean, rstd, weight, bias):
    """What a compiled step's backward computes for one norm (bf16 tensors, fp32 math)."""
    N = s.shape[-1]
    ds, dw, db = torch.ops.aten.native_layer_norm_backward(dy.float(), s.float(), [N], mean[:, None], rstd[:, None],
                                                           weight, bias, [True, True, True])
    return (ds + ds_next.float()).to(s.dtype), dw, db


def launch_label(launch: aln.Launch) -> str:
    changed = [f"{k}={v}" for k, v in launch._asdict().items() if v != aln.Launch._field_defaults[k]]
    return " ".join(changed) or "defaults"


def bench_norm(quick: bool = False) -> dict:
    rows = []
    for label, V, H, W, C, _, d, heads, batch in (SIZES[:1] if quick else SIZES):
        M, N = batch * H * W * C, d
        torch.manual_seed(0)
        s = (torch.randn(M, N, device="cuda") * 2 + 1).bfloat16()
        dy, ds_next = (torch.randn(M, N, device="cuda").bfloat16() for _ in range(2))
        mean, rstd = s.float().mean(-1), torch.rsqrt(s.float().var(-1, unbiased=False) + 1e-5)
        weight, bias = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
        want = aln._reference(*(t.double() for t in (dy, s, mean, rstd, weight, ds_next)))
        ways = {"Inductor (torch.compile)": functools.partial(torch.compile(_inductor_backward), dy, s, ds_next, mean,
                                                              rstd, weight, bias)}
        for launch in aln.LAUNCH_CHOICES[:2] if quick else aln.LAUNCH_CHOICES:
            ways[f"fused, {launch_label(launch)}"] = functools.partial(aln.layer_norm_backward, dy, s, mean, rstd,
                                                                       weight, ds_next, launch=launch)
        row = {"size": label, "M": M, "N": N, "ways": {}}
        for name, fn in ways.items():
            try:
                out = fn()
                got = (out[0], torch.stack([out[1], out[2]])) if len(out) == 3 else out
                err = max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, want))
                row["ways"][name] = {"ms": graph_time_ms(fn, quick), "rel_err": err}
            except Exception as e:  # noqa: BLE001 (a launch setting this card or Triton version cannot compile)
                row["ways"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(label, name, row["ways"][name], flush=True)
        rows.append(row)
        torch._dynamo.reset()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "norm": rows}


def format_norm(result: dict) -> str:
    out = [(f"The layer-norm backward with the residual gradient (bf16, one call replayed from a CUDA graph; "
            f"{result['device']}, torch {result['torch']})"),
           "| size | M x N | way | ms | GB/s moved | rel. error vs fp64 |", "|---|---|---|---|---|---|"]
    for r in result["norm"]:
        moved = 4 * r["M"] * r["N"] * 2  # dy, s, ds_next read, ds written, in bf16
        for name, got in r["ways"].items():
            if "error" in got:
                out.append(f"| {r['size']} | {r['M']} x {r['N']} | {name} | failed: {got['error']} | | |")
                continue
            out.append(f"| {r['size']} | {r['M']} x {r['N']} | {name} | {got['ms']:.4f} | "
                       f"{moved / got['ms'] / 1e6:.0f} | {got['rel_err']:.1e} |")
    return "\n".join(out)
