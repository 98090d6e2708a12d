"""The transformer MLP, proj(gelu_tanh(fc(x))), with the forward GELU computed in the fc GEMM's epilogue.

Unfused, the forward runs the fc GEMM, which writes h = fc(x), then a memory-bound pass that reads h and
writes gelu(h). Here one cuBLASLt GEMM (imagegen.cublaslt, epilogue GELU_AUX) writes both h and gelu(h).
Everything else is ordinary PyTorch, so torch.compile still fuses the backward: dh = gelu'(h) * d gelu(h) is
one elementwise kernel beside the cuBLAS GEMMs of dx = dh W1 and dW1 = dh^T x, and proj is a plain Linear.
h and gelu(h) are both kept for the backward (the unfused compiled graph may recompute gelu(h) there).

cuBLASLt also has a DGELU epilogue for the backward GEMM, but on an H200 (cuBLAS 13) it ran as a separate
epilogue kernel of 0.56 ms per layer at 32768 x 2048, five times Inductor's fused elementwise kernel
(`benchmarks/h200f/`), so it is not used. A Triton GEMM with gelu' in its epilogue (commit 798af8d, removed
after) took 0.29 ms there against 0.22 ms for cuBLAS's GEMM (0.11) and that elementwise kernel together
(`benchmarks/h200g/fused_mlp/`).

The epilogue applies the GELU to the fp32 accumulator (the unfused path rounds h to bf16 first).

    g = fc_gelu(x, fc_weight)                  # (..., C) -> (..., 4C): gelu_tanh(x @ fc_weight^T)
    y = gelu_mlp(x, fc_weight, proj_weight)    # (..., C) -> (..., C); fc_weight (4C, C), proj_weight (C, 4C)

The fused GEMM runs on CUDA in bf16/fp16 with C and 4C multiples of 8 (`gelu_mlp_runs`; under autocast the
inputs are cast to the autocast dtype, as F.linear would). Anywhere else the same op computes the same thing
with torch.mm and F.gelu (so the CPU tests check its gradients), as it does, with a warning, from the first
time cuBLASLt refuses a call on. Under torch.compile it is a custom op (opaque
to the compiler, with a fake shape and a registered backward the compiler traces); eager calls go through an
autograd.Function. Model option: `model.mlp_backend=cublaslt`; `scripts/benchmark.py mlp` times it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from imagegen import cublaslt


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute x in: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def gelu_mlp_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether the fused GEMM takes this input: CUDA, a bf16/fp16 compute dtype, a width and a hidden width
    (4C) that are multiples of 8."""
    return (x.is_cuda and _compute_dtype(x) in (torch.float16, torch.bfloat16) and x.shape[-1] % 8 == 0
            and hidden % 8 == 0)


_cublaslt_failed: list[str] = []  # why cuBLASLt refused, once: later calls go straight to torch.mm


def _fc_gelu_kernels(x: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C), w1 (F, C) -> g = gelu(h), h = x @ w1^T, each (M, F)."""
    if not _cublaslt_failed and cublaslt.runs(x, w1.t()):
        try:
            return cublaslt.matmul_gelu(x, w1.t())
        except cublaslt.CublasLtError as e:  # e.g. a GPU whose cuBLASLt has no GELU epilogue for this shape
            _cublaslt_failed.append(str(e))
            warnings.warn(f"model.mlp_backend=cublaslt: {e}; the MLP uses torch.mm and F.gelu instead", stacklevel=2)
    h = torch.mm(x, w1.t())
    return F.gelu(h, approximate="tanh"), h


def _fc_gelu_backward(dg: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                      h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (M, C), dw1 (F, C)."""
    dh = torch.ops.aten.gelu_backward(dg, h, approximate="tanh")
    return torch.mm(dh, w1), torch.mm(dh.t(), x)


_fc_gelu_op = torch.library.custom_op("imagegen::fc_gelu", _fc_gelu_kernels, mutates_args=())


@_fc_gelu_op.register_fake
def _(x, w1):
    g = x.new_empty(x.shape[0], w1.shape[0])
    return g, torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    x, w1 = inputs
    ctx.save_for_backward(x, w1, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dg, dh_unused):
    return _fc_gelu_backward(dg, *ctx.saved_tensors)


_fc_gelu_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFcGelu(torch.autograd.Function):
    """The same calls without the custom op, for eager calls (the dispatcher's host cost)."""

    @staticmethod
    def forward(ctx, x, w1):
        g, h = _fc_gelu_kernels(x, w1)
        ctx.save_for_backward(x, w1, h)
        return g

    @staticmethod
    def backward(ctx, dg):
        return _fc_gelu_backward(dg, *ctx.saved_tensors)


def fc_gelu(x: torch.Tensor, fc_weight: torch.Tensor, custom_op: bool | None = None) -> torch.Tensor:
    """gelu_tanh(x @ fc_weight^T) for a bias-free Linear weight (F, C): (..., C) -> (..., F), in the autocast
    dtype when autocast is on (else x's dtype). custom_op: go through the custom op (default: only while
    torch.compile traces)."""
    dtype = _compute_dtype(x)
    shape = x.shape
    x2, w1 = x.reshape(-1, shape[-1]).to(dtype).contiguous(), fc_weight.to(dtype)
    if custom_op if custom_op is not None else torch.compiler.is_compiling():
        g = _fc_gelu_op(x2, w1)[0]
    else:
        g = _EagerFcGelu.apply(x2, w1)
    return g.view(*shape[:-1], fc_weight.shape[0])


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
             custom_op: bool | None = None) -> torch.Tensor:
    """proj(gelu_tanh(fc(x))) for bias-free Linear weights fc_weight (F, C), proj_weight (C, F): (..., C) ->
    (..., C)."""
    g = fc_gelu(x, fc_weight, custom_op)
    return F.linear(g, proj_weight.to(g.dtype))
