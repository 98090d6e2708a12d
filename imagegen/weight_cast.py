"""A transformer block's Linear weights cast to the autocast dtype together, one kernel forward and one backward.

Under bf16 autocast every Linear casts its fp32 weight to bf16 on each call, and its backward casts the bf16
weight gradient back to fp32. Compiled, Inductor cannot fuse a cast into the cuBLAS GEMM that reads it, so
each is a kernel of its own: 98 small kernels a step for the 12-layer model (1-6 us each, 0.27 ms in all, plus
a launch gap each on an H200; `benchmarks/h200m/`). `cast_group` casts a block's four weights with one Triton
kernel, and its backward the four gradients with another:

    w_qkv, w_proj, w_fc, w_fc2 = cast_group([qkv.weight, proj.weight, fc.weight, fc2.weight], torch.bfloat16)

On an H200 the 12288 x 2 sparse step's casts took 0.150 ms in 24 launches, and the step 14.32 against 14.60 ms
without this (benchmarks/h200m/triton_casts, foreach_casts; torch._foreach_copy_ instead of the Triton kernel was
slower than no grouping: 48 thread blocks for a block's 3.1M weights).

The values are those of autocast's own casts (bf16 rounded to nearest even forward, widened exactly backward),
so a model computes the same numbers with or without it. Per block rather than once per model, so that DDP
still gets each block's gradients as soon as its backward is done. Under torch.compile it is a custom op
(opaque, with a fake and a registered backward); IMAGEGEN_GROUP_CASTS=0 turns it off (each Linear casts its own
weight, as autocast does), e.g. to time one against the other.
"""

from __future__ import annotations

import os
from typing import List  # noqa: UP035 (torch 2.5 infers an op's schema from typing.List, not list[...])

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENV = "IMAGEGEN_GROUP_CASTS"
BLOCK, WARPS = 2048, 4  # elements per program


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


if triton is not None:

    @triton.jit
    def _cast_part(SRC, DST, n, block, BLOCK: tl.constexpr):
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(DST + offsets, tl.load(SRC + offsets, mask=mask).to(DST.dtype.element_ty), mask=mask)  # (rtne)

    @triton.jit
    def _cast_four(SRC0, SRC1, SRC2, SRC3, DST0, DST1, DST2, DST3, N0, N1, N2, N3, BLOCK: tl.constexpr):
        """DSTk[i] = SRCk[i] in DSTk's dtype (rounded to nearest even) for i < Nk: the first cdiv(N0, BLOCK)
        programs copy tensor 0, the next ones tensor 1, and so on (Nk = 0: no programs)."""
        pid = tl.program_id(0)
        end0 = tl.cdiv(N0, BLOCK)
        end1 = end0 + tl.cdiv(N1, BLOCK)
        end2 = end1 + tl.cdiv(N2, BLOCK)
        if pid < end0:
            _cast_part(SRC0, DST0, N0, pid, BLOCK)
        elif pid < end1:
            _cast_part(SRC1, DST1, N1, pid - end0, BLOCK)
        elif pid < end2:
            _cast_part(SRC2, DST2, N2, pid - end1, BLOCK)
        else:
            _cast_part(SRC3, DST3, N3, pid - end2, BLOCK)


def _cast_kernels(tensors: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:  # noqa: UP006
    """Contiguous copies of `tensors` in `dtype`: on CUDA the contiguous ones four at a time in one Triton kernel,
    any other (a gradient a GEMM wrote transposed; anything on a CPU) by its own copy."""
    outs = [torch.empty(t.shape, dtype=dtype, device=t.device) for t in tensors]
    together = [i for i, t in enumerate(tensors) if t.is_cuda and t.is_contiguous()] if triton is not None else []
    for first in range(0, len(together), 4):
        part = together[first:first + 4]
        pad = 4 - len(part)
        srcs, dsts = [tensors[i] for i in part], [outs[i] for i in part]
        sizes = [t.numel() for t in srcs] + [0] * pad
        _cast_four[(sum(triton.cdiv(n, BLOCK) for n in sizes),)](*srcs, *srcs[:1] * pad, *dsts, *dsts[:1] * pad,
                                                                *sizes, BLOCK=BLOCK, num_warps=WARPS)
    for i, (t, out) in enumerate(zip(tensors, outs)):
        if i not in together:
            out.copy_(t)
    return outs


_cast_op = torch.library.custom_op("imagegen::cast_group", _cast_kernels, mutates_args=())


@_cast_op.register_fake
def _(tensors, dtype):
    return [torch.empty(t.shape, dtype=dtype, device=t.device) for t in tensors]


def _setup_context(ctx, inputs, output):
    tensors, dtype = inputs
    ctx.dtype, ctx.cast_dtype, ctx.shapes, ctx.device = tensors[0].dtype, dtype, [t.shape for t in tensors], tensors[0].device


def _backward(ctx, grads):
    grads = [g if g is not None else torch.zeros(shape, dtype=ctx.cast_dtype, device=ctx.device)
             for g, shape in zip(grads, ctx.shapes)]  # (a weight the loss did not use)
    return _cast_op(grads, ctx.dtype), None


_cast_op.register_autograd(_backward, setup_context=_setup_context)


def cast_group(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """tensors (all of one floating dtype, on one device) -> contiguous copies in `dtype`, differentiable (the
    gradients come back in the tensors' dtype)."""
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError("cast_group takes tensors of one dtype on one device, got "
                         f"{sorted({str(t.dtype) for t in tensors})} on {sorted({str(t.device) for t in tensors})}")
    return list(_cast_op(list(tensors), dtype))


def autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast `weight` to for a Linear on `x`, or None when it would not cast it (autocast
    off for x's device, or the weight already in that dtype)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype != dtype and weight.is_floating_point() else None
