"""Causal sliding-window attention on FlashAttention-2's own kernels: the `local` pattern at band cost.

`local` (DESIGN.md section 3) is causal attention in which query q sees key k when 0 <= q - k < window.
FlashAttention-2 implements exactly that as `window_size = (window - 1, 0)` and skips every key block
outside the band, so one call costs O(N * window) instead of O(N^2), with no mask tensor at all.
PyTorch ships the kernel (aten._flash_attention_forward/backward) but not this entry point for batched
inputs; we call its variable-length form, which reads the (B, N, heads, D) projection as a (B*N, heads, D)
view with every image its own sequence: no copy, no transpose.

    y = window_attention(q, k, v, window=64)     # q, k, v (B, N, heads, D) bf16/fp16 on CUDA -> (B, N, heads, D)

Under torch.compile the call is a torch.library custom op with a fake (meta) implementation and a
registered backward, so it traces like any aten op; in eager mode the same kernel calls run as a plain
autograd.Function, which dispatches faster. `flash_window_runs(q)` says whether it can run on q.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _torch_has_window() -> bool:
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


TORCH_HAS_WINDOW = _torch_has_window()  # torch >= 2.5 builds take window_size_left/right


@torch.compiler.assume_constant_result
def _device_supports_flash(index: int) -> bool:
    return _capability(index)[0] >= 8  # FlashAttention-2: Ampere and newer


@cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def flash_window_runs(q: torch.Tensor) -> bool:
    return (TORCH_HAS_WINDOW and q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and _device_supports_flash(q.device.index or 0))


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq: torch.Tensor, seq_len: int,
                   window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel call: (B*N, h, D) x 3 -> out (B*N, h, D), logsumexp (h, B*N) float32."""
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq, cu_seq, seq_len, seq_len, 0.0, True, False,
        window_size_left=window - 1, window_size_right=0,
    )
    return out, lse


def _flash_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, cu_seq: torch.Tensor, seq_len: int,
                    window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng_state, unused = _no_dropout_state(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, cu_seq, cu_seq, seq_len, seq_len, 0.0, True, rng_state, unused,
        window_size_left=window - 1, window_size_right=0,
    )
    return dq, dk, dv


@lru_cache(maxsize=8)
def _no_dropout_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's philox state and its unused tensor: never read without dropout, so made once."""
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


# Under torch.compile the kernels are custom ops (a fake implementation gives shapes to the tracer)...
_forward_op = torch.library.custom_op("imagegen::window_attention_fwd", _flash_forward, mutates_args=())
_backward_op = torch.library.custom_op("imagegen::window_attention_bwd", _flash_backward, mutates_args=())


@_forward_op.register_fake
def _(q, k, v, cu_seq, seq_len, window):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seq, seq_len, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seq, seq_len, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seq)
    ctx.seq_len, ctx.window = seq_len, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seq = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, cu_seq, ctx.seq_len, ctx.window)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerWindowAttention(torch.autograd.Function):
    """...and in eager mode the same two kernel calls run as a plain autograd.Function: a custom op's
    Python dispatch costs tens of microseconds a call, which a short attention call cannot hide."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seq, seq_len: int, window: int):
        out, lse = _flash_forward(q, k, v, cu_seq, seq_len, window)
        ctx.save_for_backward(q, k, v, out, lse, cu_seq)
        ctx.seq_len, ctx.window = seq_len, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seq = ctx.saved_tensors
        dq, dk, dv = _flash_backward(grad_out, q, k, v, out, lse, cu_seq, ctx.seq_len, ctx.window)
        return dq, dk, dv, None, None, None


def _cu_seq(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)  # sequence starts


@lru_cache(maxsize=64)
def _cached_cu_seq(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return _cu_seq(batch, seq_len, device)  # eager calls reuse one tensor (never written) per shape


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, h, D) x 3 -> (B, N, h, D): query q attends key k when 0 <= q - k < window."""
    B, N, h, D = q.shape
    flat = [t.reshape(B * N, h, t.shape[-1]) for t in (q, k, v)]  # (B*N, h, D): a view when (N, h, D) is dense
    flat = [t if t.stride(-1) == 1 else t.contiguous() for t in flat]
    window = min(window, N)
    if torch.compiler.is_compiling():
        out, _ = _forward_op(*flat, _cu_seq(B, N, q.device), N, window)
    else:
        out = _EagerWindowAttention.apply(*flat, _cached_cu_seq(B, N, q.device), N, window)
    return out.view(B, N, h, D)
