"""Weight gradients as one batched GEMM over token chunks, summed in fp32 (model.wgrad=chunked).

A Linear's weight gradient dW = dy^T x sums over every token of the batch: (out, T) x (T, in) with T = 32768
at 4096 tokens x 8, and out and in of 512-2048. So few output tiles cover dW that cuBLAS splits the sum over
T inside the GEMM (split-K): on an H200 each such GEMM came with memsets and a separate reduction kernel,
then autocast's cast of the bf16 result to the fp32 gradient, five or six launches per weight. Here the tokens
are cut into S chunks and one batched GEMM computes the S partial products, (S, out, T/S) x (S, T/S, in), with
enough tiles to fill the GPU without splitting; one reduction sums them in fp32, in the weight's dtype (under
torch.compile, fused with any cast that follows). The partials are rounded to the compute dtype before the sum
(cuBLAS's split-K rounds only the final sum; the fp32 gradient autocast gives is that bf16 sum, cast).

    dw = chunked_weight_grad(dy, x)          # dy (T, out), x (T, in) -> (out, in) float32
    y = linear(x, weight)                     # F.linear(x, weight) whose backward computes dW that way
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WGRADS = ("mm", "chunked")
_TILE = 128          # the output tile the chunk count is sized for
_PROGRAMS = 256      # about two tiles per SM of an H100/H200 (132 SMs)
_MAX_CHUNKS = 16
_MIN_CHUNK = 512     # tokens per chunk: a GEMM's K below this runs inefficiently


def chunks(tokens: int, out_features: int, in_features: int) -> int:
    """How many token chunks: the fewest (a power of two) that give about _PROGRAMS output tiles, at most
    _MAX_CHUNKS, dividing `tokens` into chunks of at least _MIN_CHUNK tokens; 1 when none does."""
    tiles = -(-out_features // _TILE) * -(-in_features // _TILE)
    count = 1
    while (tiles * count < _PROGRAMS and count < _MAX_CHUNKS and tokens % (2 * count) == 0
           and tokens // (2 * count) >= _MIN_CHUNK):
        count *= 2
    return count


def chunked_weight_grad(dy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum over tokens t of dy[t]^T x[t]: dy (T, out), x (T, in) -> (out, in) in `dtype`, as one batched GEMM
    over chunks(T, out, in) token chunks and one fp32 sum."""
    T, out_features = dy.shape
    S = chunks(T, out_features, x.shape[1])
    if S == 1:
        return torch.mm(dy.t(), x).to(dtype)
    parts = torch.bmm(dy.reshape(S, T // S, out_features).transpose(1, 2), x.reshape(S, T // S, x.shape[1]))
    # (S, out, in) -> (out, in), summed in fp32 (fp64 for fp64 operands)
    return parts.sum(0, dtype=torch.promote_types(parts.dtype, torch.float32)).to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _ChunkedLinear(torch.autograd.Function):
    """F.linear(x, weight) in `dtype` (autocast's, cast as F.linear would); its backward: dx = dy @ weight,
    dW = chunked_weight_grad, in the weight's dtype."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = x.dtype, weight.dtype
        return F.linear(xc, wc)

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dy = dy.to(wc.dtype)
        dx = (dy @ wc).to(x_dtype)  # (..., out) @ (out, in) -> (..., in)
        dw = chunked_weight_grad(dy.reshape(-1, dy.shape[-1]), xc.reshape(-1, xc.shape[-1]), w_dtype)
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free F.linear(x, weight), (..., in) -> (..., out), under autocast in its dtype, whose weight
    gradient is chunked_weight_grad's."""
    return _ChunkedLinear.apply(x, weight, _compute_dtype(x))
