"""Causal sliding-window attention on FlashAttention-2's own kernels: the `local` pattern at band cost.

`local` (DESIGN.md section 3) is causal attention in which query q sees key k when 0 <= q - k < window.
FlashAttention-2 implements exactly that as `window_size = (window - 1, 0)` and skips every key block
outside the band, so one call costs O(N * window) instead of O(N^2), with no mask tensor at all.
PyTorch ships the kernel (aten._flash_attention_forward/backward) but not this entry point for batched
inputs; we call its variable-length form, which reads the (B, N, heads, D) projection as a (B*N, heads, D)
view with every image its own sequence: no copy, no transpose.

    y = window_attention(q, k, v, window=64)     # q, k, v (B, N, heads, D) bf16/fp16 on CUDA -> (B, N, heads, D)

The op is a torch.library custom op with a fake (meta) implementation and a registered backward, so it
traces under torch.compile like any aten op. `flash_window_runs(q)` says whether it can run on q.
"""

from __future__ import annotations

import torch

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _torch_has_window() -> bool:
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


TORCH_HAS_WINDOW = _torch_has_window()  # torch >= 2.5 builds take window_size_left/right


@torch.compiler.assume_constant_result
def _device_supports_flash(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8  # FlashAttention-2: Ampere and newer


def flash_window_runs(q: torch.Tensor) -> bool:
    return (TORCH_HAS_WINDOW and q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and _device_supports_flash(q.device.index or 0))


@torch.library.custom_op("imagegen::window_attention_fwd", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq: torch.Tensor, seq_len: int,
             window: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq, cu_seq, seq_len, seq_len, 0.0, True, False,
        window_size_left=window - 1, window_size_right=0,
    )
    return out, lse  # (B*N, h, D), (h, B*N) float32


@_forward.register_fake
def _(q, k, v, cu_seq, seq_len, window):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("imagegen::window_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu_seq: torch.Tensor, seq_len: int,
                 window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, cu_seq, cu_seq, seq_len, seq_len, 0.0, True, rng_state, unused,
        window_size_left=window - 1, window_size_right=0,
    )
    return dq, dk, dv


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


_forward.register_autograd(_backward, setup_context=_setup_context)


def _cu_seq(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)  # sequence starts


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, h, D) x 3 -> (B, N, h, D): query q attends key k when 0 <= q - k < window."""
    B, N, h, D = q.shape
    flat = [t.reshape(B * N, h, t.shape[-1]) for t in (q, k, v)]  # (B*N, h, D): a view when (N, h, D) is dense
    flat = [t if t.stride(-1) == 1 else t.contiguous() for t in flat]
    out, _ = _forward(*flat, _cu_seq(B, N, q.device), N, min(window, N))
    return out.view(B, N, h, D)
