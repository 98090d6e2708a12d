"""Residual add + LayerNorm whose backward computes dgamma and dbeta in the same pass as the input gradient.

In a pre-LN transformer each residual add feeds the next LayerNorm: s = x + delta, y = LN(s). Inductor fuses the
add into the norm's forward kernel, and its backward kernel computes ds = ds_next + LN'(dy) while writing
partial sums of dgamma and dbeta for blocks of rows (its "mix-order reduction"); those partials are then summed
by two eager aten `.sum(dim=0)` calls, each with a memset: 50 reductions, 50 memsets and their launch gaps a
step for our 12-layer model (`benchmarks/h200i/`, "Where a training step's time goes"). Here the backward is
one Triton kernel that writes ds and one row of partial sums per program (a few hundred programs), then one small
kernel sums both partials into dgamma and dbeta. The forward is torch code (native_layer_norm in fp32, as
autocast runs F.layer_norm), so torch.compile still fuses the add, the norm and the casts into one kernel.

    s, y = add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)   # x, delta (..., C) -> s, y (..., C)
    s, y = add_layer_norm(x, None, ...)                                 # no add: s is x

y comes out in the autocast dtype when autocast is on (F.layer_norm's fp32 result rounded as the next Linear
would round it), so its gradient arrives in that dtype too. The fused backward runs on CUDA with Triton and
C <= 8192 (`fused_backward_runs`); elsewhere, and from the first time the kernel fails on (with one warning),
the same op computes the gradients with torch ops. Its exactness is tested in Triton's CPU interpreter and on
the GPU. Model option: `model.norm_backend=fused` (imagegen.model); `scripts/benchmark.py norm` times it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_WIDTH = 8192  # one row's columns live in registers


class Launch(NamedTuple):
    """How the backward kernel launches: rows per loop step (0: 4096 elements' worth of rows), warps, and
    programs per SM (each program walks a contiguous run of rows and writes one row of partial sums)."""
    block_m: int = 0
    warps: int = 8
    per_sm: int = 4


LAUNCH = Launch()
LAUNCH_CHOICES = [Launch(), Launch(per_sm=2), Launch(per_sm=8), Launch(warps=4), Launch(block_m=16),
                  Launch(block_m=4, warps=4)]

if triton is not None:

    @triton.jit
    def _layer_norm_backward(DY, S, DS_NEXT, MEAN, RSTD, W, DS, PARTIAL, M, N, rows_per_program,
                             HAS_DS_NEXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program p: rows [p * rows_per_program, ...) of ds = ds_next + LN'(dy) (all (M, N), row-major), and
        PARTIAL[0, p] = sum over its rows of dy * xhat, PARTIAL[1, p] = sum of dy (PARTIAL (2, programs, N))."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = pid * rows_per_program
        last = tl.minimum(first + rows_per_program, M)
        for start in range(first, last, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < last
            ok = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]  # (BLOCK_M, BLOCK_N)
            dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(S + offs, mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS_NEXT:
                ds += tl.load(DS_NEXT + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=ok)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(PARTIAL + pid * N + cols, dw, mask=col_ok)
        tl.store(PARTIAL + (programs + pid) * N + cols, db, mask=col_ok)

    @triton.jit
    def _sum_partials(PARTIAL, OUT, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """OUT[k, cols] = PARTIAL[k, :, cols].sum(); program (j, k) takes columns j * BLOCK_N..."""
        j = tl.program_id(0)
        k = tl.program_id(1)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            ok = (rows < P)[:, None] & col_ok[None, :]
            acc += tl.load(PARTIAL + (k * P + rows)[:, None] * N + cols[None, :], mask=ok, other=0.0)
        tl.store(OUT + k * N + cols, tl.sum(acc, axis=0), mask=col_ok)


def fused_backward_runs(s: torch.Tensor) -> bool:
    """Whether the Triton backward takes this residual stream: CUDA, Triton installed, C <= MAX_WIDTH."""
    return triton is not None and s.is_cuda and s.shape[-1] <= MAX_WIDTH


def _programs(device: torch.device, per_sm: int) -> int:
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _launch(dy: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
            ds_next: torch.Tensor | None, launch: Launch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels on (M, N) operands (mean, rstd (M,)): ds (M, N) in s's dtype, and (2, N) fp32 holding
    dgamma and dbeta."""
    launch = launch or LAUNCH
    M, N = s.shape
    block_n = triton.next_power_of_2(N)
    block_m = launch.block_m or max(1, 4096 // block_n)
    programs = max(1, min(triton.cdiv(M, block_m), _programs(s.device, launch.per_sm) if s.is_cuda else 4))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows_per_program)
    ds = torch.empty_like(s)
    partial = torch.empty(2, programs, N, device=s.device, dtype=torch.float32)
    _layer_norm_backward[(programs,)](dy, s, ds_next if ds_next is not None else ds, mean, rstd, weight, ds,
                                      partial, M, N, rows_per_program, HAS_DS_NEXT=ds_next is not None,
                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=launch.warps)
    sums = torch.empty(2, N, device=s.device, dtype=torch.float32)
    _sum_partials[(triton.cdiv(N, 32), 2)](partial, sums, programs, N, BLOCK_P=32, BLOCK_N=32, num_warps=4)
    return ds, sums


def _reference(dy: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
               ds_next: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gradients with torch ops, in fp32 (fp64 for fp64 operands)."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    dy, xhat = dy.to(dtype), (s.to(dtype) - mean[:, None]) * rstd[:, None]
    wdy = weight.to(dtype) * dy
    ds = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True)) * rstd[:, None]
    if ds_next is not None:
        ds = ds + ds_next.to(dtype)
    return ds.to(s.dtype), torch.stack([(dy * xhat).sum(0), dy.sum(0)])


_failed: list[str] = []  # why the kernel would not run, once: later calls compute with torch ops


def _check_operands(dy, s, mean, rstd, weight, ds_next) -> None:
    M, N = s.shape
    shapes_fit = (dy.shape == s.shape and mean.shape == rstd.shape == (M,) and weight.shape == (N,)
                  and (ds_next is None or ds_next.shape == s.shape))
    if not shapes_fit or not all(t.is_contiguous() for t in (dy, s, mean, rstd, weight) if t is not None) or (
            ds_next is not None and not ds_next.is_contiguous()):
        raise ValueError(f"layer_norm_backward needs contiguous dy, s, ds_next (M, N), mean, rstd (M,), weight (N,); "
                         f"got dy {tuple(dy.shape)}, s {tuple(s.shape)}, mean {tuple(mean.shape)}, rstd "
                         f"{tuple(rstd.shape)}, weight {tuple(weight.shape)}, ds_next "
                         f"{None if ds_next is None else tuple(ds_next.shape)}")


def _backward_kernels(dy: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                      weight: torch.Tensor, ds_next: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045 (the op schema)
    """-> ds (M, N) in s's dtype, and (2, N) fp32: dgamma, dbeta. The Triton kernels where they run (falling back,
    with one warning, if they fail), else torch ops."""
    _check_operands(dy, s, mean, rstd, weight, ds_next)
    if fused_backward_runs(s) and not _failed:
        try:
            return _launch(dy, s, mean, rstd, weight, ds_next)
        except Exception as e:  # noqa: BLE001 (a compile error of Triton's own types among them)
            _failed.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            warnings.warn(f"model.norm_backend=fused: the layer-norm backward kernel failed ({_failed[0]}); the "
                          "norms' backward uses torch ops instead", stacklevel=2)
    return _reference(dy, s, mean, rstd, weight, ds_next)


_op = torch.library.custom_op("imagegen::layer_norm_backward", _backward_kernels, mutates_args=())


@_op.register_fake
def _(dy, s, mean, rstd, weight, ds_next):
    return torch.empty_like(s), s.new_empty(2, s.shape[-1], dtype=torch.promote_types(s.dtype, torch.float32))


def layer_norm_backward(dy: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor, ds_next: torch.Tensor | None = None, custom_op: bool = False,
                        launch: Launch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm backward on (M, N) rows: ds = ds_next + LN'(dy) in s's dtype, and a (2, N) fp32 tensor of
    dgamma and dbeta. custom_op: through the custom op (opaque to torch.compile, which a traced backward must
    call); `launch` runs that Launch setting exactly, without the fallback."""
    if launch is not None:
        _check_operands(dy, s, mean, rstd, weight, ds_next)
        return _launch(dy, s, mean, rstd, weight, ds_next, launch)
    return (_op if custom_op else _backward_kernels)(dy, s, mean, rstd, weight, ds_next)


class _AddLayerNorm(torch.autograd.Function):
    """s = x (+ delta), y = LN(s) in fp32 (then the output dtype); the backward through layer_norm_backward."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, out_dtype):
        s = x if delta is None else x + delta
        C = s.shape[-1]
        dtype = torch.promote_types(s.dtype, torch.float32)  # fp32 at least, as autocast runs F.layer_norm
        y, mean, rstd = torch.native_layer_norm(s.to(dtype), (C,), weight.to(dtype),
                                                None if bias is None else bias.to(dtype), eps)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.delta_dtype = None if delta is None else delta.dtype
        ctx.has_bias = bias is not None
        return s, y.to(out_dtype)

    @staticmethod
    def backward(ctx, ds_next, dy):
        s, mean, rstd, weight = ctx.saved_tensors
        C = s.shape[-1]
        ds, sums = layer_norm_backward(
            dy.reshape(-1, C).contiguous(), s.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1), weight,
            None if ds_next is None else ds_next.reshape(-1, C).contiguous(), custom_op=True)
        ds = ds.view(s.shape)
        ddelta = None if ctx.delta_dtype is None else ds.to(ctx.delta_dtype)
        return ds, ddelta, sums[0].to(weight.dtype), sums[1].to(weight.dtype) if ctx.has_bias else None, None, None


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float, fused_backward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + delta (x itself when delta is None) and y = layer_norm(s) over the last dim. fused_backward:
    gradients through layer_norm_backward (one pass for ds, dgamma and dbeta), y in the autocast dtype when
    autocast is on (else s's dtype); else plain torch ops (F.layer_norm: y in fp32 under autocast), which is also
    what runs without a weight."""
    if fused_backward and weight is not None:
        device = x.device.type
        s_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else s_dtype
        return _AddLayerNorm.apply(x, delta, weight, bias, eps, out_dtype)
    s = x if delta is None else x + delta
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
