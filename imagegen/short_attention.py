"""Causal attention over many short independent sequences, one Triton program per sequence.

`column` attention is H-token causal attention for every (image, column, channel, head): thousands of
sequences of 64 tokens, each a strided slice of the (B, N, heads, D) projection. FlashAttention runs them
as a batch of tiny problems (128-wide tiles half empty, an fp32 dq accumulator, several passes). Here
one program holds a whole sequence in registers: the forward reads q, k, v once and writes o and the
log-sum-exp; the backward reads q, k, v, o, do once and writes dq, dk, dv, with no atomics. `row` is the
same problem with the sequence along the row.

Measured on an H200 (bf16, forward + backward, `scripts/benchmark.py calls`): 0.22 ms of GPU time for
`column` at N=4096 x 16 and 0.18 ms at N=12288 x 4, against 0.65 and 0.49 ms for cuDNN attention on the
zero-copy views; `auto` uses it. Eager calls are bound by the host (about 0.5 ms to issue the call on that
machine), so their times vary; CUDA graphs and compiled models see the GPU time.

    y = short_causal_attention(q5, k5, v5)   # (n0, S, n1, n2, D) strided views -> (n0, S, n1, n2, D)

The sequence axis is dim 1; dims 0, 2, 3 index independent sequences. Runs on CUDA in bf16/fp16 for
S <= 128 and D in {16, 32, 64, 128} (`short_attention_runs`); the op is a torch.library custom op with a
fake implementation and a registered backward under torch.compile, an autograd.Function in eager mode.
"""

from __future__ import annotations

import math

import torch

from imagegen.kernel_op import attention_op, compile_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the views + SDPA path is used instead
    triton = None

MAX_SEQ = 128


def short_attention_runs(q: torch.Tensor, seq_len: int) -> bool:
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and seq_len <= MAX_SEQ and q.shape[-1] in (16, 32, 64, 128))


if triton is not None:

    @triton.jit
    def _this_sequence(n1, n2, S, BLOCK_S: tl.constexpr, D: tl.constexpr):
        """The sequence this program owns: (pid, i0, i1, i2, positions, head-dim range, positions < S),
        where program id = (i0 * n1 + i1) * n2 + i2."""
        pid = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        return pid, pid // (n1 * n2), (pid // n2) % n1, pid % n2, s, tl.arange(0, D), s < S

    @triton.jit
    def _load(ptr, i0, i1, i2, s, d, inside, st0, st1, st2, st3):
        """The (BLOCK_S, D) tile of sequence (i0, i1, i2), zero past its end."""
        return tl.load(ptr + i0 * st0 + i1 * st2 + i2 * st3 + s[:, None] * st1 + d[None, :], mask=inside[:, None],
                       other=0.0)

    @triton.jit
    def _short_fwd(Q, K, V, O, LSE, n1, n2, S, sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                   so0, so1, so2, so3, scale, BLOCK_S: tl.constexpr, D: tl.constexpr):
        pid, i0, i1, i2, s, d, inside = _this_sequence(n1, n2, S, BLOCK_S, D)
        q = _load(Q, i0, i1, i2, s, d, inside, sq0, sq1, sq2, sq3)
        k = _load(K, i0, i1, i2, s, d, inside, sk0, sk1, sk2, sk3)
        v = _load(V, i0, i1, i2, s, d, inside, sv0, sv1, sv2, sv3)
        scores = tl.dot(q, tl.trans(k)) * scale  # (S, S) fp32
        causal = (s[:, None] >= s[None, :]) & inside[None, :]
        scores = tl.where(causal, scores, float("-inf"))
        m = tl.max(scores, 1)
        p = tl.exp(scores - m[:, None])
        denom = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v) / denom[:, None]
        tl.store(O + i0 * so0 + i1 * so2 + i2 * so3 + s[:, None] * so1 + d[None, :], o.to(O.dtype.element_ty),
                 mask=inside[:, None])
        tl.store(LSE + pid * BLOCK_S + s, m + tl.log(denom))

    @triton.jit
    def _short_bwd(Q, K, V, O, DO, LSE, DQ, DK, DV, n1, n2, S, sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3,
                   sv0, sv1, sv2, sv3, so0, so1, so2, so3, sd0, sd1, sd2, sd3, sg0, sg1, sg2, sg3, scale,
                   BLOCK_S: tl.constexpr, D: tl.constexpr):
        pid, i0, i1, i2, s, d, inside = _this_sequence(n1, n2, S, BLOCK_S, D)
        q = _load(Q, i0, i1, i2, s, d, inside, sq0, sq1, sq2, sq3)
        k = _load(K, i0, i1, i2, s, d, inside, sk0, sk1, sk2, sk3)
        v = _load(V, i0, i1, i2, s, d, inside, sv0, sv1, sv2, sv3)
        o = _load(O, i0, i1, i2, s, d, inside, so0, so1, so2, so3)
        do = _load(DO, i0, i1, i2, s, d, inside, sd0, sd1, sd2, sd3)
        lse = tl.load(LSE + pid * BLOCK_S + s)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (S,)
        # on the transposed scores (keys x queries): p^T and ds^T come out of their dots in the layout the dots
        # for dv and dk take as their first operand; only ds is transposed (for dq)
        causal_t = (s[:, None] <= s[None, :]) & inside[None, :] & inside[:, None]
        pt = tl.where(causal_t, tl.exp(tl.dot(k, tl.trans(q)) * scale - lse[None, :]), 0.0)  # (S, S) fp32
        dv = tl.dot(pt.to(do.dtype), do)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :]) * scale).to(q.dtype)
        dk = tl.dot(dst, q)
        dq = tl.dot(tl.trans(dst), k)
        out = i0 * sg0 + i1 * sg2 + i2 * sg3 + s[:, None] * sg1 + d[None, :]  # dq, dk, dv: the same strides
        tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=inside[:, None])
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=inside[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=inside[:, None])


def _block(seq_len: int) -> int:
    return max(16, triton.next_power_of_2(seq_len))


# Warps per program for the forward and the backward kernel (None = 4 up to 64 tokens, else 8), and a limit on
# registers per thread (Triton's maxnreg; 0 = the compiler's choice), which trades spills for programs per SM.
# `scripts/benchmark.py tune` times the alternatives on the GPU.
# On an H200 the backward's limit of 128 registers (3 -> 4 programs per SM) took 0.172 against 0.179 ms per call at
# N=12288 x 4 and 0.215 against 0.223 ms at N=4096 x 16 (benchmarks/h200l/tune).
# Programs that walk several sequences in a pipelined loop (2 to 16 a program, 2 or 3 stages) were exact but slower
# on an H200: at N=12288 x 4, 0.184-0.187 ms per call for the forward's choices and 0.210-0.223 ms for the
# backward's, against 0.173 ms for one sequence a program (commit b3bda09, benchmarks/h200o/short_loop); removed.
LAUNCH = {"fwd_warps": None, "bwd_warps": None, "fwd_registers": 0, "bwd_registers": 128}


def _compile(seq_len: int, kernel: str = "fwd") -> dict:
    """The kernel's compile options: warps and, where LAUNCH sets one, a register limit."""
    chosen, registers = LAUNCH[f"{kernel}_warps"], LAUNCH[f"{kernel}_registers"]
    return compile_options(chosen if chosen is not None else (4 if seq_len <= 64 else 8), registers=registers)


def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n0, S, n1, n2, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous (n0, S, n1, n2, D)
    block = _block(S)
    lse = torch.empty(n0 * n1 * n2 * block, dtype=torch.float32, device=q.device)
    _short_fwd[(n0 * n1 * n2,)](
        q, k, v, o, lse, n1, n2, S, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *o.stride()[:4],
        1.0 / math.sqrt(D), BLOCK_S=block, D=D, **_compile(S))
    return o, lse


def _launch_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _backward_into(grad_out, q, k, v, o, lse, dq, dk, dv)
    return dq, dk, dv


def _backward_into(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Writes the gradients into dq, dk, dv: tensors of q's shape with one set of strides (three contiguous
    tensors, or the slices of one packed gradient)."""
    n0, S, n1, n2, D = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    _short_bwd[(n0 * n1 * n2,)](
        q, k, v, o, grad_out, lse, dq, dk, dv, n1, n2, S, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
        *o.stride()[:4], *grad_out.stride()[:4], *dq.stride()[:4], 1.0 / math.sqrt(D),
        BLOCK_S=_block(S), D=D, **_compile(S, "bwd"))


def _forward_fake(q, k, v):
    n0, S, n1, n2, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(n0 * n1 * n2 * _block(S),
                                                                               dtype=torch.float32)


def _backward_fake(grad_out, q, k, v, o, lse):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


_short_attention, _forward = attention_op("short_attention", _launch_forward, _launch_backward, _forward_fake,
                                          _backward_fake, tensors=3)


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n0, S, n1, n2, D) x 3 -> (n0, S, n1, n2, D) contiguous: causal attention along dim 1. Under
    torch.compile the kernels are custom ops; in eager mode an autograd.Function calls them directly
    (imagegen.kernel_op)."""
    return _short_attention(q, k, v)


def sequences(t: torch.Tensor, rows: int, column: bool) -> torch.Tensor:
    """(B, N, h, D) raster of `rows` image rows -> (n0, S, n1, n2, D) view, sequence on dim 1: along the image
    rows for `column` (sequences = (image, position in row, head), S = rows), else along each row (sequences
    = (image row, head), S = the row). No copy: strided slices of a packed projection qualify."""
    B, N, h, D = t.shape
    if column:
        return t.view(B, rows, N // rows, h, D)
    return t.view(B * rows, N // rows, 1, h, D)


# The packed form (see imagegen.band_attention): one (B, N, 3, h, D) projection in, one packed gradient out;
# `rows` and `column` say which sequences (see `sequences`).


def _launch_forward_packed(qkv: torch.Tensor, rows: int, column: bool) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _launch_forward(*(sequences(t, rows, column) for t in qkv.unbind(2)))
    return o.view(qkv[:, :, 0].shape), lse


def _launch_backward_packed(grad_out: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                            rows: int, column: bool) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3, h, D)
    views = [sequences(t, rows, column) for t in (*qkv.unbind(2), o, grad_out.contiguous(), *dqkv.unbind(2))]
    _backward_into(views[4], *views[:3], views[3], lse, *views[5:])
    return dqkv


def _forward_packed_fake(qkv, rows, column):
    B, N, _, h, D = qkv.shape
    n0, S, n1, n2, _ = sequences(qkv.new_empty(B, N, h, D), rows, column).shape
    return qkv.new_empty(B, N, h, D), qkv.new_empty(n0 * n1 * n2 * _block(S), dtype=torch.float32)


def _backward_packed_fake(grad_out, qkv, o, lse, rows, column):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


_short_attention_packed, _forward_packed = attention_op("short_attention_packed", _launch_forward_packed,
                                                        _launch_backward_packed, _forward_packed_fake,
                                                        _backward_packed_fake, tensors=1)


def short_causal_attention_packed(qkv: torch.Tensor, rows: int, column: bool) -> torch.Tensor:
    """(B, N, 3, h, D) -> (B, N, h, D): short_causal_attention on the `sequences(rows, column)` of the q, k, v
    slices of one projection; the gradient of qkv is one contiguous (B, N, 3, h, D) tensor."""
    return _short_attention_packed(qkv, rows, column)
