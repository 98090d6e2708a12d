"""Causal band attention (`local`) as Triton kernels: query q sees key k when 0 <= q - k < window.

A FlashAttention-style forward over 64 x 64 tiles that visits only the key tiles inside the band, and a
backward in two kernels without atomics: one program per key tile accumulates dk and dv over the query
tiles that see it, one program per query tile accumulates dq over its key tiles. Inputs are the
(B, N, heads, D) projection (strided slices allowed, last dim contiguous); nothing is copied.

    y = band_attention(q, k, v, window=64)     # (B, N, h, D) -> (B, N, h, D) contiguous

Runs on CUDA in bf16/fp16 (`band_attention_runs`); its exactness is tested in Triton's CPU interpreter
(fp32) and on the GPU. `backend=triton` selects it for `local`; `auto` keeps FlashAttention-2's sliding
window until this kernel measures faster.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Launch settings per kernel: (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages). `scripts/benchmark.py
# tune` times the alternatives on the GPU; these are the values it measured fastest (README).
LAUNCH = {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3)}


def band_attention_runs(q: torch.Tensor) -> bool:
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (16, 32, 64, 128))


if triton is not None:

    @triton.jit
    def _tile(ptr, b, h, rows, d, N, sb, sn, sh):
        """The (len(rows), D) tile of rows `rows` of head h of image b; zero past the end."""
        return tl.load(ptr + b * sb + h * sh + rows[:, None] * sn + d[None, :], mask=(rows < N)[:, None], other=0.0)

    @triton.jit
    def _band(qs, ks, N, W):
        """(len(qs), len(ks)) bool: key k is inside the band of query q, and both exist."""
        dist = qs[:, None] - ks[None, :]
        return (dist >= 0) & (dist < W) & (ks < N)[None, :] & (qs < N)[:, None]

    @triton.jit
    def _row_stats(LSE, DELTA, bh, qs, N):
        """Log-sum-exp (forward) and rowsum(o * do) of queries qs."""
        lse = tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0)
        return lse, tl.load(DELTA + bh * N + qs, mask=qs < N, other=0.0)

    @triton.jit
    def _probs_and_grads(q, k, v, do, lse, delta, qs, ks, N, W, scale):
        """The tile's attention probabilities p (recomputed) and score gradients ds = p * (dp - delta)."""
        p = tl.where(_band(qs, ks, N, W), tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        return p, (p * (dp - delta[:, None]) * scale).to(q.dtype)

    @triton.jit
    def _fwd(Q, K, V, O, LSE, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        m0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        qs = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        lo = tl.maximum(m0 - W + 1, 0) // BLOCK_N * BLOCK_N
        for n0 in range(lo, m0 + BLOCK_M, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            v = _tile(V, b, h, ks, d, N, svb, svn, svh)
            s = tl.where(_band(qs, ks, N, W), tl.dot(q, tl.trans(k)) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_i = tl.where(qs < N, l_i, 1.0)  # rows past the end saw no key; they are not stored
        o = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + qs[:, None] * son + d[None, :], o.to(O.dtype.element_ty),
                 mask=(qs < N)[:, None])
        tl.store(LSE + bh * N + qs, m_i + tl.log(l_i), mask=qs < N)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                  sdb, sdn, sdh, sgb, sgn, sgh, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr):
        n0 = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        ks = n0 + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        k = _tile(K, b, h, ks, d, N, skb, skn, skh)
        v = _tile(V, b, h, ks, d, N, svb, svn, svh)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        hi = tl.minimum(n0 + BLOCK_N + W - 1, N)
        for m0 in range(n0 // BLOCK_M * BLOCK_M, hi, BLOCK_M):
            qs = m0 + tl.arange(0, BLOCK_M)
            q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
            do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
            lse, delta = _row_stats(LSE, DELTA, bh, qs, N)
            p, ds = _probs_and_grads(q, k, v, do, lse, delta, qs, ks, N, W, scale)  # (M, N) each
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds), q)
        out = b * sgb + h * sgh + ks[:, None] * sgn + d[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=(ks < N)[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=(ks < N)[:, None])

    @triton.jit
    def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                sdb, sdn, sdh, sgb, sgn, sgh, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr):
        m0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        qs = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
        lse, delta = _row_stats(LSE, DELTA, bh, qs, N)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        lo = tl.maximum(m0 - W + 1, 0) // BLOCK_N * BLOCK_N
        for n0 in range(lo, m0 + BLOCK_M, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            v = _tile(V, b, h, ks, d, N, svb, svn, svh)
            _, ds = _probs_and_grads(q, k, v, do, lse, delta, qs, ks, N, W, scale)
            dq += tl.dot(ds, k)
        tl.store(DQ + b * sgb + h * sgh + qs[:, None] * sgn + d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(qs < N)[:, None])


def _bnh(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, N, h, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("imagegen::band_attention_fwd", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H * N, dtype=torch.float32, device=q.device)  # (B, h, N)
    bm, bn, warps, stages = LAUNCH["fwd"]
    _fwd[(triton.cdiv(N, bm), B * H)](q, k, v, o, lse, N, window, H, *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(o),
                                      1.0 / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn, D=D, num_warps=warps,
                                      num_stages=stages)
    return o, lse


@_forward.register_fake
def _(q, k, v, window):
    B, N, H, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(B * H * N, dtype=torch.float32)


@torch.library.custom_op("imagegen::band_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, H, D = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    delta = (o.float() * grad_out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, h, N): rowsum(o * do)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    args = (N, window, H, *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(grad_out), *_bnh(dq), 1.0 / math.sqrt(D))
    bm, bn, warps, stages = LAUNCH["dkdv"]  # one program per key tile
    _bwd_dkdv[(triton.cdiv(N, bn), B * H)](q, k, v, grad_out, lse, delta, dk, dv, *args, BLOCK_M=bm, BLOCK_N=bn,
                                           D=D, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = LAUNCH["dq"]  # one program per query tile
    _bwd_dq[(triton.cdiv(N, bm), B * H)](q, k, v, grad_out, lse, delta, dq, *args, BLOCK_M=bm, BLOCK_N=bn, D=D,
                                         num_warps=warps, num_stages=stages)
    return dq, dk, dv


@_backward_op.register_fake
def _(grad_out, q, k, v, o, lse, window):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.window = window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    return (*_backward_op(grad_out, q, k, v, o, lse, ctx.window), None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, h, D) x 3 -> (B, N, h, D): query q attends key k when 0 <= q - k < window."""
    return _forward(q, k, v, min(window, q.shape[1]))[0]
