"""Causal band attention (`local`) as Triton kernels: query q sees key k when 0 <= q - k < window.

A FlashAttention-style forward visits only the key tiles inside the band: the fewest tiles that hold the keys
a query tile sees, ending at its last query (with a window of 192 keys, a 64 x 64 x 3 row, 64 queries visit
two tiles of 128 keys or four of 64). The backward, where the window fits one tile (a 64 x 64 palette row:
64 keys), is one pass: a program walks a strip of consecutive tiles, keeping the previous key tile and its
dk, dv so far, so each input is read once and each gradient written once. Wider windows take two kernels
without atomics: one program per query tile accumulates dq over its key tiles (and computes rowsum(o * do)
for the other), then one program per key tile accumulates dk and dv over the query tiles that see it. Each
kernel walks its tiles in one loop, every tile masked. Inputs are the (B, N, heads, D) projection (strided
slices allowed, last dim contiguous); nothing is copied.

    y = band_attention(q, k, v, window=64)     # (B, N, h, D) -> (B, N, h, D) contiguous

Runs on CUDA in bf16/fp16 (`band_attention_runs`); its exactness is tested in Triton's CPU interpreter
(fp32) and on the GPU. `auto` and `backend=triton` run `local` with it. On an H200 (README,
`scripts/benchmark.py calls`) one call, forward + backward, took 0.54 ms of GPU time at N=4096 x 16 and
N=12288 x 4 with the two-kernel backward, against 0.83 and 0.90 ms for FlashAttention-2's sliding window;
the one-pass backward brought N=4096 x 16 to 0.42 ms (`scripts/benchmark.py tune`, benchmarks/h200g); walking
each kernel's tiles in one loop and testing the band in one comparison, 0.40 ms at N=12288 x 4 and 0.31 ms at
N=4096 x 16 (benchmarks/h200o).
Under torch.compile the kernels are custom ops; eager calls go through an autograd.Function, because the
custom ops' dispatch cost more host time than the kernels' GPU time (which made eager timings vary from
0.55 to 1.06 ms).
"""

from __future__ import annotations

import math

import torch

from imagegen.kernel_op import attention_op, compile_options

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Launch settings per kernel: (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages[, registers per thread]).
# `scripts/benchmark.py tune` times the alternatives on the GPU. Registers (Triton's maxnreg; 0 or absent: the
# compiler's choice) trade spills for programs per SM: 4 warps of 136 registers fit 3 programs on an SM,
# of 128 registers 4. On an H200, 2 pipeline stages ran 4-7% faster than 3
# (benchmarks/h200c/final/tuning.md), and the GPU exactness tests pass with them (benchmarks/h200d/gpu_tests.log).
# With the register limits below, N=12288 x 4 took 0.513 ms per call against 0.550 ms without, and N=4096 x 16 0.371
# against 0.394 ms (the forward's limit and the strip setting; benchmarks/h200l/tune).
# Walking the tiles in one loop with the band test in one comparison (_band), at N=12288 x 4 the forward took 3
# stages, dq 3 stages and 168 registers (0.378 ms per call against 0.385 ms with 2 stages and 128;
# benchmarks/h200o/mask).
LAUNCH = {"fwd": (64, 64, 4, 3, 128), "dkdv": (64, 64, 4, 2, 168), "dq": (64, 64, 4, 3, 168)}
# The one-pass backward for windows of at most BLOCK keys: (BLOCK, tiles per strip, warps, pipeline stages);
# BLOCK 0 turns it off (dq and dk/dv kernels for every window). On an H200 at N=4096 x 16, strips of 8 tiles
# with 4 warps and 2 stages took 0.417 ms per call against 0.502 ms for the two kernels (benchmarks/h200g); since
# the backward works on transposed tiles, strips of 16 tiles with 1 stage took 0.371 ms (benchmarks/h200l/tune).
# With the band test in one comparison, 2 stages took 0.308 ms against 0.363 ms for 1 (benchmarks/h200o/mask).
LAUNCH["strip"] = (64, 16, 4, 2)
# The kernels walk their tiles in one loop, every tile masked. They could also walk them in three runs (masked,
# wholly inside the band unmasked, masked; removed after commit d0c10a9): with a window of 192 keys each run had
# one or two tiles, and each run was a loop of its own that the compiler pipelined apart (a tile's loads waited
# for nothing before them). In one loop, N=12288 x 4 took 0.419 ms per call against 0.509 ms
# (benchmarks/h200o/one_loop). Since key tiles end at a query tile's last query, a 64-query tile visits two tiles
# of 128 keys where its window is 192, as many keys as four of 64 in fewer, larger steps; at N=12288 x 4 they
# were slower in each kernel: forward 0.405 ms per call against 0.380, dq 0.406 against 0.389, dk/dv (128 queries
# a step) 0.411 against 0.387 (benchmarks/h200p/tiles). Skipping the band test on tiles wholly inside the band (a
# branch on the tile inside the loop, commit 820ca54, reverted) moved no kernel by more than the spread of repeated
# timings: at N=12288 x 4 0.383 ms per call (forward only) to 0.404 (all three) against 0.394 (benchmarks/h200p/edges).
# A version for windows of up to three tiles (192 keys), keeping three key tiles, was exact but 2.5x slower than
# the two kernels at N=12288 x 4 (1.35 vs 0.53 ms; commit 528dc66, benchmarks/h200g/strip3), and was removed.


def band_attention_runs(q: torch.Tensor) -> bool:
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (16, 32, 64, 128))


LOG2E = 1.4426950408889634  # the kernels work in base 2: exp(x) = exp2(x * log2(e))

if triton is not None:

    @triton.jit
    def _tile(ptr, b, h, rows, d, N, sb, sn, sh):
        """The (len(rows), D) tile of rows `rows` of head h of image b; zero past the end."""
        return tl.load(ptr + b * sb + h * sh + rows[:, None] * sn + d[None, :], mask=(rows < N)[:, None], other=0.0)

    @triton.jit
    def _this_tile(H, BLOCK: tl.constexpr, D: tl.constexpr):
        """The tile this program owns: (first row, batch*head index, batch, head, its rows, head-dim range)."""
        start = tl.program_id(0) * BLOCK
        bh = tl.program_id(1)
        return start, bh, bh // H, bh % H, start + tl.arange(0, BLOCK), tl.arange(0, D)

    @triton.jit
    def _band(qs, ks, W):
        """(len(qs), len(ks)) bool: key k is inside the band of query q, 0 <= q - k < W, in one unsigned comparison.
        Keys past N need no test of their own: every query that exists comes before them (q - k < 0). Queries
        past N are never stored, and their rows of q, do, lse and delta load as zeros, so they add nothing to dk
        and dv."""
        return (qs[:, None] - ks[None, :]).to(tl.uint32, bitcast=True) < W  # W promotes to unsigned

    @triton.jit
    def _key_tiles(m0, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The key tiles lo, lo+BLOCK_N, ... < end that queries m0 .. m0+BLOCK_M-1 visit: the fewest tiles of
        BLOCK_N keys that hold the W + BLOCK_M - 1 keys those queries see, ending after the last query (so a
        tile need not start at a multiple of BLOCK_N: with a window of 192 keys, 64 queries visit two tiles of
        128 keys), or starting at key 0."""
        end = m0 + BLOCK_M
        return tl.maximum(end - tl.cdiv(W + BLOCK_M - 1, BLOCK_N) * BLOCK_N, 0), end

    @triton.jit
    def _band_fwd(Q, K, V, O, LSE, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        """The online softmax (base 2) of one query tile over its key tiles, every tile masked, in one loop the
        compiler pipelines. The running maximum m_i is kept in unscaled scores, so that scaling and subtracting
        it are one fused multiply-add per score."""
        m0, bh, b, h, qs, d = _this_tile(H, BLOCK_M, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        lo, end = _key_tiles(m0, W, BLOCK_M, BLOCK_N)
        for n0 in range(lo, end, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            s = tl.dot(q, tl.trans(_tile(K, b, h, ks, d, N, skb, skn, skh)))
            s = tl.where(_band(qs, ks, W), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
            alpha = tl.math.exp2((m_i - m_new) * qk_scale)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), _tile(V, b, h, ks, d, N, svb, svn, svh))
            m_i = m_new
        l_i = tl.where(qs < N, l_i, 1.0)  # rows past the end are not stored (and never divide by zero)
        o = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + qs[:, None] * son + d[None, :], o.to(O.dtype.element_ty),
                 mask=(qs < N)[:, None])
        tl.store(LSE + bh * N + qs, m_i * qk_scale + tl.math.log2(l_i), mask=qs < N)  # base-2 log-sum-exp

    @triton.jit
    def _key_tile_grads(q, do, lse, delta, k, v, dk, dv, qs, ks, W, qk_scale):
        """A query tile's share of one key tile's dk (without the softmax scale, applied once when it is stored)
        and dv, on the transposed tile (keys x queries); returns ds^T too. p^T and ds^T come out of their dots in
        the layout the next dots take as their first operand, so nothing is transposed in registers."""
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (keys, queries)
        pt = tl.where(_band(qs, ks, W).trans(), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q)
        return dst, dk, dv

    @triton.jit
    def _band_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                       sdb, sdn, sdh, sgb, sgn, sgh, qk_scale, scale, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, D: tl.constexpr):
        """dk and dv of one key tile, accumulated over the query tiles that see its keys: queries n0 .. n0 +
        BLOCK_N + W - 2, in tiles of BLOCK_M starting at n0 (_key_tile_grads)."""
        n0, bh, b, h, ks, d = _this_tile(H, BLOCK_N, D)
        k = _tile(K, b, h, ks, d, N, skb, skn, skh)
        v = _tile(V, b, h, ks, d, N, svb, svn, svh)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        for m0 in range(n0, tl.minimum(n0 + BLOCK_N + W - 1, N), BLOCK_M):
            qs = m0 + tl.arange(0, BLOCK_M)
            q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
            do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
            lse = tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0)
            delta = tl.load(DELTA + bh * N + qs, mask=qs < N, other=0.0)
            _, dk, dv = _key_tile_grads(q, do, lse, delta, k, v, dk, dv, qs, ks, W, qk_scale)
        out = b * sgb + h * sgh + ks[:, None] * sgn + d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=(ks < N)[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=(ks < N)[:, None])

    @triton.jit
    def _band_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                     sob, son, soh, sdb, sdn, sdh, sgb, sgn, sgh, qk_scale, scale, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D: tl.constexpr):
        """dq of one query tile, accumulated over its key tiles (those of the forward); it also computes and
        stores delta = rowsum(o * do) of its queries, which the dk/dv kernel (launched after it) reads. The
        score gradients ds = p * (dp - delta) leave out the softmax scale, applied once to the summed dq."""
        m0, bh, b, h, qs, d = _this_tile(H, BLOCK_M, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
        o = _tile(O, b, h, qs, d, N, sob, son, soh)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * N + qs, delta, mask=qs < N)
        lse = tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        lo, end = _key_tiles(m0, W, BLOCK_M, BLOCK_N)
        for n0 in range(lo, end, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            p = tl.where(_band(qs, ks, W), p, 0.0)
            dp = tl.dot(do, tl.trans(_tile(V, b, h, ks, d, N, svb, svn, svh)))
            dq += tl.dot((p * (dp - delta[:, None])).to(q.dtype), k)
        tl.store(DQ + b * sgb + h * sgh + qs[:, None] * sgn + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=(qs < N)[:, None])

    @triton.jit
    def _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, W, qk_scale):
        """One (query tile, key tile) pair of the strip backward: its share of dk and dv (_key_tile_grads) and
        of dq (without the softmax scale, applied when it is stored): only ds is transposed in registers."""
        dst, dk, dv = _key_tile_grads(q, do, lse, delta, k, v, dk, dv, qs, ks, W, qk_scale)
        dq += tl.dot(tl.trans(dst), k)
        return dq, dk, dv

    @triton.jit
    def _strip_queries(Q, O, DO, LSE, b, h, bh, qs, d, N, sqb, sqn, sqh, sob, son, soh, sdb, sdn, sdh):
        """A query tile's q, do, lse and delta = rowsum(o * do)."""
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
        delta = tl.sum(_tile(O, b, h, qs, d, N, sob, son, soh).to(tl.float32) * do.to(tl.float32), 1)
        return q, do, tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0), delta

    @triton.jit
    def _store_key_grads(DK, DV, dk, dv, b, h, ks, d, first, N, sgb, sgn, sgh, scale):
        """dk (times the softmax scale), dv of a complete key tile, unless the strip before owns it (ks < first)
        or it lies past N."""
        out = b * sgb + h * sgh + ks[:, None] * sgn + d[None, :]
        mine = ((ks >= first) & (ks < N))[:, None]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mine)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mine)

    @triton.jit
    def _band_bwd_strip(Q, K, V, O, DO, LSE, DQ, DK, DV, N, W, H, S, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                        sob, son, soh, sdb, sdn, sdh, sgb, sgn, sgh, qk_scale, scale, BLOCK: tl.constexpr,
                        D: tl.constexpr):
        """The whole backward in one pass, for a window of at most BLOCK keys: query tile i then sees only key
        tiles i-1 and i. One program walks a strip of S tiles in order, keeping key tile i-1 (k, v and its dk, dv
        so far) from the step before, so each of q, k, v, o, do is read once and dq, dk, dv written once. Tile i-1
        is complete after query tile i; the tile before the strip's first belongs to the strip before (its
        share here is not stored), and the strip's last key tile also takes the next strip's first query tile."""
        first = tl.program_id(0) * S * BLOCK
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        d = tl.arange(0, D)
        stop = tl.minimum(first + S * BLOCK, N)
        ks = first - BLOCK + tl.arange(0, BLOCK)  # key tile i-1 (rows before 0 load as zeros)
        before = (ks >= 0)[:, None]
        k = tl.load(K + b * skb + h * skh + ks[:, None] * skn + d[None, :], mask=before, other=0.0)
        v = tl.load(V + b * svb + h * svh + ks[:, None] * svn + d[None, :], mask=before, other=0.0)
        dk = tl.zeros((BLOCK, D), tl.float32)
        dv = tl.zeros((BLOCK, D), tl.float32)
        for m0 in range(first, stop, BLOCK):
            qs = m0 + tl.arange(0, BLOCK)
            q, do, lse, delta = _strip_queries(Q, O, DO, LSE, b, h, bh, qs, d, N, sqb, sqn, sqh, sob, son, soh,
                                               sdb, sdn, sdh)
            dq = tl.zeros((BLOCK, D), tl.float32)
            dq, dk, dv = _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, W, qk_scale)
            _store_key_grads(DK, DV, dk, dv, b, h, ks, d, first, N, sgb, sgn, sgh, scale)  # key tile i-1 is complete
            ks = qs
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            v = _tile(V, b, h, ks, d, N, svb, svn, svh)
            dk = tl.zeros((BLOCK, D), tl.float32)
            dv = tl.zeros((BLOCK, D), tl.float32)
            dq, dk, dv = _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, W, qk_scale)
            tl.store(DQ + b * sgb + h * sgh + qs[:, None] * sgn + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                     mask=(qs < N)[:, None])
        qs = stop + tl.arange(0, BLOCK)  # the next strip's first query tile: its share of the last key tile
        q, do, lse, delta = _strip_queries(Q, O, DO, LSE, b, h, bh, qs, d, N, sqb, sqn, sqh, sob, son, soh,
                                           sdb, sdn, sdh)
        _, dk, dv = _strip_pair(q, do, lse, delta, k, v, tl.zeros((BLOCK, D), tl.float32), dk, dv, qs, ks, W,
                                qk_scale)
        _store_key_grads(DK, DV, dk, dv, b, h, ks, d, first, N, sgb, sgn, sgh, scale)


def _bnh(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, N, h, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    window: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H * N, dtype=torch.float32, device=q.device)  # (B, h, N)
    bm, bn, *options = LAUNCH["fwd"]
    _band_fwd[(triton.cdiv(N, bm), B * H)](q, k, v, o, lse, N, window, H, *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(o),
                                           LOG2E / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn, D=D,
                                           **compile_options(*options))
    return o, lse


def _launch_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _backward_into(grad_out, q, k, v, o, lse, window, dq, dk, dv)
    return dq, dk, dv


def _backward_into(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, window: int, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Writes the gradients into dq, dk, dv: (B, N, h, D) tensors of one shape and the same strides (three
    contiguous tensors, or the q, k, v slices of one packed (B, N, 3, h, D) gradient)."""
    B, N, H, D = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    block, strip, *options = LAUNCH["strip"]
    if window <= block:  # one pass (query tile i sees key tiles i-1 and i)
        _band_bwd_strip[(triton.cdiv(N, block * strip), B * H)](
            q, k, v, o, grad_out, lse, dq, dk, dv, N, window, H, strip, *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(o),
            *_bnh(grad_out), *_bnh(dq), *scales, BLOCK=block, D=D, **compile_options(*options))
        return
    delta = torch.empty(B * H * N, dtype=torch.float32, device=q.device)  # (B, h, N): rowsum(o * do)
    bm, bn, *options = LAUNCH["dq"]  # one program per query tile; writes delta first
    _band_bwd_dq[(triton.cdiv(N, bm), B * H)](q, k, v, o, grad_out, lse, delta, dq, N, window, H, *_bnh(q),
                                              *_bnh(k), *_bnh(v), *_bnh(o), *_bnh(grad_out), *_bnh(dq), *scales,
                                              BLOCK_M=bm, BLOCK_N=bn, D=D, **compile_options(*options))
    bm, bn, *options = LAUNCH["dkdv"]  # one program per key tile
    _band_bwd_dkdv[(triton.cdiv(N, bn), B * H)](q, k, v, grad_out, lse, delta, dk, dv, N, window, H,
                                                *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(grad_out), *_bnh(dk), *scales,
                                                BLOCK_M=bm, BLOCK_N=bn, D=D, **compile_options(*options))


def _forward_fake(q, k, v, window):
    B, N, H, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(B * H * N, dtype=torch.float32)


def _backward_fake(grad_out, q, k, v, o, lse, window):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


_band_attention, _forward = attention_op("band_attention", _launch_forward, _launch_backward, _forward_fake,
                                         _backward_fake, tensors=3)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, h, D) x 3 -> (B, N, h, D): query q attends key k when 0 <= q - k < window. Under torch.compile
    the kernels are custom ops (opaque to the compiler, with fake shapes and a backward); in eager mode an
    autograd.Function calls them directly (imagegen.kernel_op)."""
    return _band_attention(q, k, v, min(window, q.shape[1]))


# The packed form: one (B, N, 3, h, D) projection in, one packed gradient out. A layer that projects q, k, v with
# one (B*N, C) x (C, 3C) GEMM hands its output over as it is (the kernels read the three strided slices), and the
# backward writes dq, dk, dv into the slices of one tensor, which is the gradient of that GEMM's output: one
# dgrad and one wgrad GEMM follow, with nothing copied in between (imagegen.attention.attend_packed).


def _launch_forward_packed(qkv: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(*qkv.unbind(2), window)


def _launch_backward_packed(grad_out: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                            window: int) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3, h, D)
    _backward_into(grad_out, *qkv.unbind(2), o, lse, window, *dqkv.unbind(2))
    return dqkv


def _forward_packed_fake(qkv, window):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty(B, N, H, D), qkv.new_empty(B * H * N, dtype=torch.float32)


def _backward_packed_fake(grad_out, qkv, o, lse, window):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


_band_attention_packed, _forward_packed = attention_op("band_attention_packed", _launch_forward_packed,
                                                       _launch_backward_packed, _forward_packed_fake,
                                                       _backward_packed_fake, tensors=1)


def band_attention_packed(qkv: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, 3, h, D) -> (B, N, h, D): band_attention on the q, k, v slices of one projection; the gradient
    of qkv is one contiguous (B, N, 3, h, D) tensor."""
    return _band_attention_packed(qkv, min(window, qkv.shape[1]))
