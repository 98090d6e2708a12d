"""A bias-free Linear whose three GEMMs (forward, dgrad, wgrad) go through imagegen.cublaslt, which times
cuBLASLt's heuristic candidates once per shape and keeps the fastest, where torch.mm takes cuBLAS's first choice.

On an H200 (`scripts/benchmark.py gemms`, benchmarks/h200h/gemms) the fastest candidate was 1.14x torch.mm on the
24576 x 1536 x 512 q/k/v projection and 1.03-1.07x on the output projection's three 512-wide GEMMs. The model uses
it for the attention's projections, and the fused MLP (imagegen.gelu_mlp) for its plain GEMMs, when
model.mlp_backend is cublaslt or fused; IMAGEGEN_CUBLASLT_GEMMS=0 turns both back to torch.mm (the MLP's GELU
epilogues stay). The 12288 x 2 sparse training step took 14.12 ms with it against 14.32 ms without, its matmuls
8.95 against 9.26 ms (H200, benchmarks/h200m/cublaslt_gemms).

    y = lt_linear(x, weight)      # x (..., C_in), weight (C_out, C_in) -> (..., C_out), like F.linear(x, weight)
    y = lt_linear(x, weight, r)   # r + F.linear(x, weight), r read in the GEMM's epilogue (cublaslt.matmul_add)

With a residual r (the residual stream, in the compute dtype) the GEMM adds it as it writes its output: the sum
is written once and rounded once, and the layer norm after it reads one tensor instead of two. The model adds its
residual stream so where it can (imagegen.model.adds_in_gemm); IMAGEGEN_GEMM_RESIDUAL=0 turns that off. (Measured:
14.43 against 14.48 ms off, within the noise; benchmarks/h200m/residual_epilogue.)

Under autocast the inputs are cast to the autocast dtype first, as F.linear would. A call cuBLASLt does not take
(not CUDA, not bf16/fp16, misaligned) is torch.mm's, so CPU tests check the gradients. Under torch.compile it is a
custom op (opaque, with a fake and a registered backward the compiler traces); eager calls go through an
autograd.Function.
"""

from __future__ import annotations

import os
import warnings

import torch

from imagegen import cublaslt

ENV, RESIDUAL_ENV = "IMAGEGEN_CUBLASLT_GEMMS", "IMAGEGEN_GEMM_RESIDUAL"
_failed: list[str] = []  # why cuBLASLt refused a call, once: later calls go to torch.mm


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def residual_enabled() -> bool:
    return os.environ.get(RESIDUAL_ENV, "1") != "0"


def _mm_kernels(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    if not _failed and enabled() and cublaslt.runs(a, b) and (c is None or c.is_contiguous()):
        try:
            return cublaslt.matmul(a, b) if c is None else cublaslt.matmul_add(a, b, c)
        except cublaslt.CublasLtError as e:
            _failed.append(str(e))
            warnings.warn(f"cuBLASLt GEMM: {e}; GEMMs use torch.mm from here on", stacklevel=2)
    return torch.mm(a, b) if c is None else torch.addmm(c, a, b)


_mm_op = torch.library.custom_op("imagegen::lt_mm", _mm_kernels, mutates_args=())


@_mm_op.register_fake
def _(a, b, c=None):
    return a.new_empty(a.shape[0], b.shape[1])


def mm(a: torch.Tensor, b: torch.Tensor, custom_op: bool = False, c: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) (+ c (M, N)) -> (M, N) contiguous, through cuBLASLt's timed-fastest algorithm where
    cublaslt.runs(a, b) (and IMAGEGEN_CUBLASLT_GEMMS is not 0), else torch.mm / torch.addmm. custom_op: through a
    custom op (not differentiable), for code the compiler traces, such as a registered backward."""
    return _mm_op(a, b, c) if custom_op else _mm_kernels(a, b, c)


def _forward(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, C_in), w (C_out, C_in) (, residual (M, C_out)) -> (residual +) x w^T (M, C_out)."""
    return mm(x, w.t(), c=residual)


def _backward_kernels(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                      custom_op: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx = dy w (M, C_in), dw = dy^T x (C_out, C_in); custom_op: as mm's."""
    dy = dy.contiguous()
    return mm(dy, w, custom_op), mm(dy.t(), x, custom_op)


_linear_op = torch.library.custom_op("imagegen::lt_linear", _forward, mutates_args=())


@_linear_op.register_fake
def _(x, w, residual=None):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup_context(ctx, inputs, output):
    x, w, residual = inputs
    ctx.save_for_backward(x, w)
    ctx.adds_residual = residual is not None


def _backward(ctx, dy):
    return *_backward_kernels(dy, *ctx.saved_tensors, custom_op=True), (dy if ctx.adds_residual else None)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinear(torch.autograd.Function):
    """The same calls without the custom op, for eager calls (the dispatcher's host cost)."""

    @staticmethod
    def forward(ctx, x, w, residual):
        ctx.save_for_backward(x, w)
        ctx.adds_residual = residual is not None
        return _forward(x, w, residual)

    @staticmethod
    def backward(ctx, dy):
        return *_backward_kernels(dy, *ctx.saved_tensors, custom_op=False), (dy if ctx.adds_residual else None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute x in: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def flat_residual(residual: torch.Tensor | None, dtype: torch.dtype, width: int) -> torch.Tensor | None:
    """A residual (..., width) for a GEMM to add, as a contiguous (M, width) matrix; it must be in the GEMM's
    compute dtype (the epilogue adds it as it is)."""
    if residual is None:
        return None
    if residual.dtype != dtype:
        raise ValueError(f"a GEMM adds a residual in its compute dtype {dtype}, got {residual.dtype}")
    return residual.reshape(-1, width).contiguous()


def lt_linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) without bias, its GEMMs through cuBLASLt (see the module docstring); with a residual
    (..., C_out) in the compute dtype, residual + F.linear(x, weight) from the same GEMM."""
    dtype = compute_dtype(x)
    shape = x.shape
    x2, w = x.reshape(-1, shape[-1]).to(dtype).contiguous(), weight.to(dtype)
    residual = flat_residual(residual, dtype, weight.shape[0])
    if torch.compiler.is_compiling():
        y = _linear_op(x2, w, residual)
    else:
        y = _EagerLinear.apply(x2, w, residual)
    return y.view(*shape[:-1], weight.shape[0])
