"""Every GEMM of one training step of the 12- or 24-layer benchmark model, timed as PyTorch runs it (torch.mm)
and as the fastest of cuBLASLt's heuristic candidates (imagegen.cublaslt): what choosing the algorithm per shape
could take off the step's matmul time.

    python scripts/benchmark.py gemms [--sizes 0]     # size index of scripts/benchmark.py train (GPU)

A step's GEMMs per layer: the forward x W^T of the q/k/v projection, the attention's output projection, fc and
fc2; per Linear the backward's dgrad dy W and wgrad dy^T x (dy^T a transposed view, as autograd passes it); and
once the head. Operands are bf16 in the layouts the model's GEMMs see (a weight as the transpose of its
(out, in) parameter). Times are medians of CUDA-event timings of one call, and of ten calls captured in one CUDA
graph (per call), as a reduce-overhead step replays them: there a memset that cuBLAS issues before a kernel is a
graph node of its own. The table names the kernels (and memsets) each cuBLASLt call launched.
"""

from __future__ import annotations

import torch

from imagegen.benchmark import graph_time_ms, launched_kernels, time_ms
from imagegen.cuda_graph import repeated


def step_gemms(size: tuple) -> list[dict]:
    """The GEMMs of one training step at a SIZES entry (label, vocab, H, W, C, layers, d, heads, batch):
    role, out (M, N) = a (M, K) @ b (K, N), whether a / b are transposed views, and calls per step."""
    _, vocab, H, W, C, layers, d, _, batch = size
    tokens = batch * H * W * C
    linears = [("qkv", 3 * d, d, layers), ("attention proj", d, d, layers), ("fc", 4 * d, d, layers),
               ("fc2", d, 4 * d, layers), ("head", vocab, d, 1)]  # (name, out features, in features, per step)
    gemms = []
    for name, out_f, in_f, count in linears:
        gemms.append({"role": f"{name} forward", "M": tokens, "N": out_f, "K": in_f, "a_t": False, "b_t": True,
                      "per_step": count})
        gemms.append({"role": f"{name} dgrad", "M": tokens, "N": in_f, "K": out_f, "a_t": False, "b_t": False,
                      "per_step": count})
        gemms.append({"role": f"{name} wgrad", "M": out_f, "N": in_f, "K": tokens, "a_t": True, "b_t": False,
                      "per_step": count})
    return gemms


def _operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
    """A (rows, cols) bf16 matrix, contiguous or the transpose of a contiguous (cols, rows)."""
    if transposed:
        return torch.randn(cols, rows, device="cuda", dtype=torch.bfloat16).t()
    return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)


_IN_GRAPH = 10  # calls captured back to back in one CUDA graph, as a training step's graph replays them


def bench_gemms(size_index: int = 0) -> dict:
    from imagegen import cublaslt
    from imagegen.train_benchmark import SIZES

    size = SIZES[size_index]
    rows = []
    for gemm in step_gemms(size):
        M, N, K = gemm["M"], gemm["N"], gemm["K"]
        a, b = _operand(M, K, gemm["a_t"]), _operand(K, N, gemm["b_t"])
        torch_mm = lambda a=a, b=b: torch.mm(a, b)
        torch_ms, torch_graph_ms = time_ms(torch_mm), graph_time_ms(repeated(torch_mm, _IN_GRAPH)) / _IN_GRAPH
        row = {**gemm, "torch_kernels": launched_kernels(torch_mm)}
        try:
            cublaslt.matmul(a, b)  # chooses the algorithm (times the candidates)
            lt_mm = lambda a=a, b=b: cublaslt.matmul(a, b)
            lt_ms, lt_graph_ms = time_ms(lt_mm), graph_time_ms(repeated(lt_mm, _IN_GRAPH)) / _IN_GRAPH
            row["cublaslt_kernels"] = launched_kernels(lt_mm)
        except (cublaslt.CublasLtError, ValueError) as e:
            lt_ms, lt_graph_ms, row["error"] = None, None, str(e)
        flops = 2 * M * N * K
        rows.append({**row, "torch_ms": torch_ms, "cublaslt_ms": lt_ms, "torch_tflops": flops / torch_ms / 1e9,
                     "cublaslt_tflops": flops / lt_ms / 1e9 if lt_ms else None,
                     "torch_graph_ms": torch_graph_ms, "cublaslt_graph_ms": lt_graph_ms})
    total = {key: sum(r[key] * r["per_step"] for r in rows if r["cublaslt_ms"])
             for key in ("torch_ms", "cublaslt_ms", "torch_graph_ms", "cublaslt_graph_ms")}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": size[0], "gemms": rows,
            "per_step_ms": total, "plans": cublaslt.plans()}


def format_gemms(result: dict) -> str:
    out = [(f"The GEMMs of one training step, {result['size']} ({result['device']}, torch {result['torch']}; "
            "medians of one call)"),
           ("| role | M x N x K | a, b | per step | torch.mm ms | TFLOP/s | cuBLASLt best ms | TFLOP/s | x | "
            "torch.mm in a graph | cuBLASLt in a graph | cuBLASLt's kernels |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["gemms"]:
        layout = ("T" if r["a_t"] else "N") + ("T" if r["b_t"] else "N")
        lt = (f"{r['cublaslt_ms']:.4f} | {r['cublaslt_tflops']:.0f} | {r['torch_ms'] / r['cublaslt_ms']:.2f}x"
              if r["cublaslt_ms"] else f"({r.get('error', 'no result')}) | | ")
        graph = (f"{r['torch_graph_ms']:.4f} | " + (f"{r['cublaslt_graph_ms']:.4f}" if r["cublaslt_ms"] else "")
                 if "torch_graph_ms" in r else " | ")
        kernels = ", ".join(f"`{k[:48]}`" for k in r.get("cublaslt_kernels", []))
        out.append(f"| {r['role']} | {r['M']} x {r['N']} x {r['K']} | {layout} | {r['per_step']} | "
                   f"{r['torch_ms']:.4f} | {r['torch_tflops']:.0f} | {lt} | {graph} | {kernels} |")
    t = result["per_step_ms"]
    out.append(f"\nPer step (each time x calls per step): torch.mm {t['torch_ms']:.2f} ms, cuBLASLt's best "
               f"{t['cublaslt_ms']:.2f} ms")
    if "torch_graph_ms" in t:
        out.append(f"In CUDA graphs ({_IN_GRAPH} calls a graph, as a step replays them): torch.mm "
                   f"{t['torch_graph_ms']:.2f} ms, cuBLASLt's best {t['cublaslt_graph_ms']:.2f} ms")
    return "\n".join(out)
