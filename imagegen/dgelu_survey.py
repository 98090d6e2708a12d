"""The MLP backward's dgrad GEMM with the GELU backward: cuBLAS plus an elementwise kernel against
imagegen.dgelu_matmul's one Triton kernel, at each training size's shape.

    python scripts/benchmark.py dgelu [--out dgelu.json]     # (GPU)

Each row is the GPU time of one call replayed from a CUDA graph (no launch overhead), and its error against
the same computation in fp32.
"""

from __future__ import annotations

import functools

import torch

from imagegen import dgelu_matmul
from imagegen.benchmark import graph_time_ms
from imagegen.train_benchmark import SIZES


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def bench_dgelu(quick: bool = False) -> dict:
    """For each size: (dy @ w) * gelu_tanh'(h) in bf16 at tokens x 4d x d, as cuBLAS + aten's gelu_backward
    (eager), as cuBLAS + Inductor's kernel (torch.compile), cuBLAS's GEMM alone, and the fused kernel at each
    launch setting of dgelu_matmul.LAUNCH_CHOICES (the Gluon ping-pong kernel among them), with what each
    compiled to."""
    rows = []
    for label, V, H, W, C, _, d, heads, batch in (SIZES[:1] if quick else SIZES):
        M, K, N = batch * H * W * C, d, 4 * d
        torch.manual_seed(0)
        dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(K, N, device="cuda") / K**0.5).to(torch.bfloat16)
        h = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        ref = torch.ops.aten.gelu_backward(dy.float() @ w.float(), h.float(), approximate="tanh")

        def unfused(dy, w, h):
            return torch.ops.aten.gelu_backward(torch.mm(dy, w), h, approximate="tanh")

        compiled = torch.compile(unfused)
        ways = {"cuBLAS + aten gelu_backward": functools.partial(unfused, dy, w, h),
                "cuBLAS + Inductor gelu_backward": functools.partial(compiled, dy, w, h),
                "cuBLAS GEMM alone": functools.partial(torch.mm, dy, w)}
        launches = {}  # way -> its launch setting
        for launch in dgelu_matmul.LAUNCH_CHOICES[:2] if quick else dgelu_matmul.LAUNCH_CHOICES:
            name = f"fused, {dgelu_matmul.launch_label(launch)}"
            launches[name] = launch
            ways[name] = functools.partial(dgelu_matmul.matmul_dgelu, dy, w, h, launch=launch)
            if not (launch.prefetch_h or launch.fast_tanh):  # the same GEMM as another row's
                ways[f"Triton GEMM alone, {dgelu_matmul.launch_label(launch)}"] = functools.partial(
                    dgelu_matmul.matmul_dgelu, dy, w, h, launch=launch, dgelu=False)
        row = {"size": label, "M": M, "K": K, "N": N, "ways": {}}
        for name, fn in ways.items():
            try:
                out = fn()
                err = None if "alone" in name else _relative_error(out, ref)
                row["ways"][name] = {"ms": graph_time_ms(fn, quick), "rel_err": err,
                                     "compiled": dgelu_matmul.RESOURCES.get(launches.get(name))}
            except Exception as e:  # noqa: BLE001 (a launch setting this card or Triton version cannot compile)
                row["ways"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(label, name, row["ways"][name], flush=True)
        rows.append(row)
        torch._dynamo.reset()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dgelu": rows}


def format_dgelu(result: dict) -> str:
    out = [(f"The MLP's dgrad GEMM with gelu' (bf16, one call replayed from a CUDA graph; {result['device']}, "
            f"torch {result['torch']})"),
           "| size | M x N x K | way | ms | TFLOP/s of the GEMM | rel. error vs fp32 | registers, spills, shared KiB |",
           "|---|---|---|---|---|---|---|"]
    for r in result["dgelu"]:
        flop = 2 * r["M"] * r["N"] * r["K"]
        for name, got in r["ways"].items():
            if "error" in got:
                out.append(f"| {r['size']} | {r['M']} x {r['N']} x {r['K']} | {name} | failed: {got['error']} | | | |")
                continue
            err = "" if got["rel_err"] is None else f"{got['rel_err']:.1e}"
            res = got.get("compiled")
            res = f"{res['registers']}, {res['spills']}, {res['shared_kib']:.0f}" if res else ""
            out.append(f"| {r['size']} | {r['M']} x {r['N']} x {r['K']} | {name} | {got['ms']:.4f} | "
                       f"{flop / got['ms'] / 1e9:.0f} | {err} | {res} |")
    return "\n".join(out)
