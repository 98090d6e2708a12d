"""The transformer MLP, proj(gelu_tanh(fc(x))), with the GELU in GEMM epilogues instead of elementwise passes.

Unfused, the forward runs the fc GEMM, which writes h = fc(x), then a memory-bound pass that reads h and
writes gelu(h); the backward's first GEMM writes dg = dy @ W2, then another pass reads dg and h and writes
dh = dg * gelu'(h). Here:
- forward (model.mlp_backend=cublaslt and fused): one GEMM writes both h and gelu(h), the GELU applied to the
  fp32 accumulator (the unfused path rounds h to bf16 first): with fused on Hopper, imagegen.dgelu_pingpong's
  Gluon kernel, whose epilogue (two stores) overlaps the other consumer warpgroup's matmul; elsewhere cuBLASLt's
  (imagegen.cublaslt, epilogue GELU_AUX);
- backward (fused only): dh comes from one GEMM with gelu' in its epilogue (imagegen.dgelu_matmul): on
  Hopper a Gluon kernel whose epilogue overlaps the matmul (imagegen.dgelu_pingpong), 0.145 ms at
  32768 x 2048 x 512 on an H200, elsewhere a Triton kernel, 0.170 ms, against 0.216 ms for cuBLAS plus
  Inductor's elementwise kernel (`benchmarks/h200k/`, `benchmarks/h200i/fused_mlp/dgelu.md`). With
  cublaslt, the backward is cuBLAS and Inductor's kernel.
The other GEMMs (proj, dx = dh W1, dW1 = dh^T x, dW2 = dy^T gelu(h)) take cuBLASLt's timed-fastest algorithm
(imagegen.lt_linear.mm; torch.mm with IMAGEGEN_CUBLASLT_GEMMS=0), and h and gelu(h) are kept for the backward.

cuBLASLt also has a DGELU epilogue for the backward GEMM, but on an H200 (cuBLAS 13) it ran as a separate
epilogue kernel of 0.56 ms per layer at 32768 x 2048, five times Inductor's fused elementwise kernel
(`benchmarks/h200f/`), so it is not used.

    y = gelu_mlp(x, fc_weight, proj_weight, fused=True)  # (..., C) -> (..., C); fc_weight (4C, C),
                                                         # proj_weight (C, 4C)

The fused GEMMs run on CUDA in bf16/fp16 with C and 4C multiples of 8 (`gelu_mlp_runs`; under autocast the
inputs are cast to the autocast dtype, as F.linear would; the backward's also needs a GPU with TMA and C a
multiple of 64, `dgelu_matmul.matmul_dgelu_runs`, else it takes cuBLAS's path; the Gluon forward a Hopper GPU and C
a multiple of 64, `forward_pingpong_runs`, else cuBLASLt's). Anywhere else the same op
computes the same thing with torch.mm and F.gelu (so the CPU tests check its gradients), as it does, with a
warning, from the first time cuBLASLt refuses a call on. Under torch.compile it is a custom op (opaque to the
compiler, with a fake shape and a registered backward the compiler traces); eager calls go through an
autograd.Function. Model option: `model.mlp_backend=cublaslt|fused`; `scripts/benchmark.py mlp` and `dgelu`
time them.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from imagegen import cublaslt, dgelu_pingpong
from imagegen.dgelu_matmul import matmul_dgelu, matmul_dgelu_runs
from imagegen.lt_linear import compute_dtype, flat_residual, mm

FORWARD_PINGPONG_ENV = "IMAGEGEN_FORWARD_PINGPONG"  # 0: the fused forward takes cuBLASLt's GEMM on Hopper too


def gelu_mlp_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether the fused GEMM takes this input: CUDA, a bf16/fp16 compute dtype, a width and a hidden width
    (4C) that are multiples of 8."""
    return (x.is_cuda and compute_dtype(x) in (torch.float16, torch.bfloat16) and x.shape[-1] % 8 == 0
            and hidden % 8 == 0)


_cublaslt_failed: list[str] = []  # why cuBLASLt refused, once: later calls go straight to torch.mm
_pingpong_failed: list[str] = []  # why the Gluon forward failed, once: later calls go to cuBLASLt
forward_kernels: set[str] = set()  # which forward GEMMs have run: "pingpong", "cublaslt", "torch" (for tests)


def forward_pingpong_runs(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether the fused forward takes imagegen.dgelu_pingpong's kernel: a Hopper GPU with Gluon, contiguous
    x (M, C), w1 (F, C) of one 16-bit dtype, C a multiple of 64 and F of 8, and not turned off."""
    return (os.environ.get(FORWARD_PINGPONG_ENV, "1") != "0" and not _pingpong_failed
            and dgelu_pingpong.pingpong_runs(x)
            and x.dtype == w1.dtype and x.dtype in (torch.float16, torch.bfloat16) and x.is_contiguous()
            and w1.is_contiguous() and x.shape[1] == w1.shape[1] and x.shape[1] % 64 == 0 and w1.shape[0] % 8 == 0)


def _fc_gelu_kernels(x: torch.Tensor, w1: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C), w1 (F, C) -> g = gelu(h), h = x @ w1^T, each (M, F); fused: the Gluon kernel where it runs."""
    if fused and forward_pingpong_runs(x, w1):
        try:
            g, h, _ = dgelu_pingpong.matmul_gelu_pingpong(x, w1)
            forward_kernels.add("pingpong")
            return g, h
        except Exception as e:  # noqa: BLE001 (e.g. a Triton whose Gluon API differs: its own error types)
            _pingpong_failed.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            warnings.warn(f"model.mlp_backend=fused: the forward's Gluon GEMM failed ({_pingpong_failed[-1]}); "
                          "it uses cuBLASLt's GELU epilogue from here on", stacklevel=2)
    if not _cublaslt_failed and cublaslt.runs(x, w1.t()):
        try:
            g, h = cublaslt.matmul_gelu(x, w1.t())
            forward_kernels.add("cublaslt")
            return g, h
        except cublaslt.CublasLtError as e:  # e.g. a GPU whose cuBLASLt has no GELU epilogue for this shape
            _cublaslt_failed.append(str(e))
            warnings.warn(f"model.mlp_backend=cublaslt: {e}; the MLP uses torch.mm and F.gelu instead", stacklevel=2)
    h = torch.mm(x, w1.t())
    forward_kernels.add("torch")
    return F.gelu(h, approximate="tanh"), h


def _mlp_kernels(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, fused: bool,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, C), w1 (F, C), w2 (C, F) (, residual (M, C)) -> y = (residual +) g @ w2^T (M, C), g = gelu(h) and
    h = x @ w1^T (M, F). fused: the first GEMM is the Gluon kernel where it runs (and, in the op's inputs, it
    rides along to the backward)."""
    g, h = _fc_gelu_kernels(x, w1, fused)
    return mm(g, w2.t(), c=residual), g, h


def _mlp_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, g: torch.Tensor,
                  h: torch.Tensor, fused: bool, custom_op: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, C), dw1 (F, C), dw2 (C, F). fused: dh = (dy @ w2) * gelu'(h) in one GEMM
    (imagegen.dgelu_matmul) where it runs, instead of cuBLAS and an elementwise kernel; through its custom op when
    custom_op (the registered backward, which torch.compile traces)."""
    dy = dy.contiguous()
    if fused and matmul_dgelu_runs(dy, w2, h):
        dh = matmul_dgelu(dy, w2, h, custom_op=custom_op)
    else:
        dh = torch.ops.aten.gelu_backward(mm(dy, w2, custom_op), h, approximate="tanh")
    return mm(dh, w1, custom_op), mm(dh.t(), x, custom_op), mm(dy.t(), g, custom_op)


_mlp_op = torch.library.custom_op("imagegen::gelu_mlp", _mlp_kernels, mutates_args=())


@_mlp_op.register_fake
def _(x, w1, w2, fused, residual=None):
    g = x.new_empty(x.shape[0], w1.shape[0])
    return x.new_empty(x.shape[0], w2.shape[0]), g, torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    x, w1, w2, ctx.fused, residual = inputs
    ctx.adds_residual = residual is not None
    _, g, h = output
    ctx.save_for_backward(x, w1, w2, g, h)
    ctx.mark_non_differentiable(g, h)


def _backward(ctx, dy, dg_unused, dh_unused):
    return (*_mlp_backward(dy, *ctx.saved_tensors, ctx.fused, custom_op=True), None,
            dy if ctx.adds_residual else None)


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerMLP(torch.autograd.Function):
    """The same calls without the custom op, for eager calls (the dispatcher's host cost)."""

    @staticmethod
    def forward(ctx, x, w1, w2, fused, residual):
        y, g, h = _mlp_kernels(x, w1, w2, fused, residual)
        ctx.save_for_backward(x, w1, w2, g, h)
        ctx.fused, ctx.adds_residual = fused, residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_mlp_backward(dy, *ctx.saved_tensors, ctx.fused, custom_op=False), None,
                dy if ctx.adds_residual else None)


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor, custom_op: bool | None = None,
             fused: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """proj(gelu_tanh(fc(x))) for bias-free Linear weights fc_weight (F, C), proj_weight (C, F): (..., C) ->
    (..., C), in the autocast dtype when autocast is on (else x's dtype). custom_op: go through the custom op
    (default: only while torch.compile traces). fused: on Hopper the forward's first GEMM is the Gluon kernel
    (imagegen.dgelu_pingpong), and the backward's first GEMM applies gelu' in its epilogue
    (imagegen.dgelu_matmul). residual (..., C) in the compute dtype: returns residual + the MLP's output,
    the sum written by the proj GEMM's epilogue (imagegen.lt_linear)."""
    dtype = compute_dtype(x)
    shape = x.shape
    x2, w1, w2 = x.reshape(-1, shape[-1]).to(dtype).contiguous(), fc_weight.to(dtype), proj_weight.to(dtype)
    residual = flat_residual(residual, dtype, proj_weight.shape[0])
    if custom_op if custom_op is not None else torch.compiler.is_compiling():
        y = _mlp_op(x2, w1, w2, fused, residual)[0]
    else:
        y = _EagerMLP.apply(x2, w1, w2, fused, residual)
    return y.view(*shape[:-1], proj_weight.shape[0])
