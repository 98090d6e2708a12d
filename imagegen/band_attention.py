"""Causal band attention (`local`) as Triton kernels: query q sees key k when 0 <= q - k < window.

A FlashAttention-style forward over 64 x 64 tiles that visits only the key tiles inside the band. The
backward, where the window fits one tile (a 64 x 64 palette row: 64 keys), is one pass: a program walks a
strip of consecutive tiles, keeping the previous key tile and its dk, dv so far, so each input is read once
and each gradient written once. Wider windows take two kernels without atomics: one program per query tile
accumulates dq over its key tiles (and computes rowsum(o * do) for the other), then one program per key
tile accumulates dk and dv over the query tiles that see it. Each kernel walks its tiles in one loop, every
tile masked; with LAUNCH["one_loop"] emptied, only the tiles at the window's two edges are masked, in three
runs of tiles (with a window of 192, a 64 x 64 x 3 row, half of the tiles a query visits lie wholly inside
the band), which was slower on the GPU (see LAUNCH). Inputs are the (B, N, heads, D) projection (strided
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
# Walking the tiles in one loop (LAUNCH["one_loop"] below) with the band test in one comparison (_band), at
# N=12288 x 4 the forward took 3 stages, dq 3 stages and 168 registers (0.378 ms per call against 0.385 ms with 2
# stages and 128; benchmarks/h200o/mask).
LAUNCH = {"fwd": (64, 64, 4, 3, 128), "dkdv": (64, 64, 4, 2, 168), "dq": (64, 64, 4, 3, 168)}
# The one-pass backward for windows of at most BLOCK keys: (BLOCK, tiles per strip, warps, pipeline stages);
# BLOCK 0 turns it off (dq and dk/dv kernels for every window). On an H200 at N=4096 x 16, strips of 8 tiles
# with 4 warps and 2 stages took 0.417 ms per call against 0.502 ms for the two kernels (benchmarks/h200g); since
# the backward works on transposed tiles, strips of 16 tiles with 1 stage took 0.371 ms (benchmarks/h200l/tune).
# With the band test in one comparison, 2 stages took 0.308 ms against 0.363 ms for 1 (benchmarks/h200o/mask).
LAUNCH["strip"] = (64, 16, 4, 2)
# The kernels that walk their tiles in one loop, every tile masked, instead of three runs (masked, inside the band
# unmasked, masked). With a window of 192 keys each run has one or two tiles, and each run is a loop of its own
# that the compiler pipelines apart (a tile's loads wait for nothing before them): in one loop, N=12288 x 4 took
# 0.419 ms per call against 0.509 ms (benchmarks/h200o/one_loop); the masks cost less than the stalls they saved.
LAUNCH["one_loop"] = ("fwd", "dq", "dkdv")
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
    def _key_tile_phases(m0, N, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The key tiles n0 (multiples of BLOCK_N) that queries m0 .. m0+BLOCK_M-1 visit, in three runs:
        [lo, b) masked (the window's far edge), [b, c) wholly inside the band (no mask), [c, end) masked
        (the diagonal). A tile needs no mask when every key is at most the first query (n0+BLOCK_N-1 <= m0)
        and within the window of the last (m0+BLOCK_M-1 - n0 < W); such tiles hold no key past N."""
        lo = tl.maximum(m0 - W + 1, 0) // BLOCK_N * BLOCK_N
        inside_window = tl.cdiv(tl.maximum(m0 + BLOCK_M - W, 0), BLOCK_N) * BLOCK_N
        diagonal = tl.cdiv(tl.maximum(m0 - BLOCK_N + 2, 0), BLOCK_N) * BLOCK_N
        b = tl.maximum(tl.minimum(inside_window, diagonal), lo)
        return lo, b, tl.maximum(diagonal, b), m0 + BLOCK_M

    @triton.jit
    def _query_tile_phases(n0, N, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The query tiles m0 (multiples of BLOCK_M) that see keys n0 .. n0+BLOCK_N-1, in three runs
        [start, b) masked, [b, c) wholly inside the band and before N, [c, end) masked."""
        start = n0 // BLOCK_M * BLOCK_M
        end = tl.minimum(n0 + BLOCK_N + W - 1, N)
        causal = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # first tile whose queries all follow the keys
        last = tl.minimum(n0 + W - BLOCK_M, N - BLOCK_M)  # last m0 whose queries all see key n0 and exist
        inside_end = tl.where(last >= 0, last // BLOCK_M * BLOCK_M + BLOCK_M, 0)
        b = tl.minimum(tl.maximum(causal, start), end)
        return start, b, tl.maximum(tl.minimum(inside_end, end), b), end

    @triton.jit
    def _fwd_step(q, k, v, m_i, l_i, acc, qs, ks, N, W, qk_scale, MASKED: tl.constexpr):
        """One key tile of the online softmax (base 2). The running maximum m_i is kept in unscaled scores, so
        that scaling and subtracting it are one fused multiply-add per score."""
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where(_band(qs, ks, W), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        alpha = tl.math.exp2((m_i - m_new) * qk_scale)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _fwd_run(q, K, V, b, h, d, qs, m_i, l_i, acc, start, stop, N, W, skb, skn, skh, svb, svn, svh, qk_scale,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """The online softmax over key tiles start, start+BLOCK_N, ... < stop."""
        for n0 in range(start, stop, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = _fwd_step(q, _tile(K, b, h, ks, d, N, skb, skn, skh), _tile(V, b, h, ks, d, N, svb, svn, svh),
                                      m_i, l_i, acc, qs, ks, N, W, qk_scale, MASKED)
        return m_i, l_i, acc

    @triton.jit
    def _band_fwd(Q, K, V, O, LSE, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, ONE_LOOP: tl.constexpr):
        m0, bh, b, h, qs, d = _this_tile(H, BLOCK_M, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        lo, inner, diagonal, end = _key_tile_phases(m0, N, W, BLOCK_M, BLOCK_N)
        if ONE_LOOP:  # every tile masked, in one loop the compiler can pipeline
            m_i, l_i, acc = _fwd_run(q, K, V, b, h, d, qs, m_i, l_i, acc, lo, end, N, W, skb, skn, skh, svb, svn,
                                     svh, qk_scale, BLOCK_N, True)
        else:
            m_i, l_i, acc = _fwd_run(q, K, V, b, h, d, qs, m_i, l_i, acc, lo, inner, N, W, skb, skn, skh, svb, svn,
                                     svh, qk_scale, BLOCK_N, True)
            m_i, l_i, acc = _fwd_run(q, K, V, b, h, d, qs, m_i, l_i, acc, inner, diagonal, N, W, skb, skn, skh, svb,
                                     svn, svh, qk_scale, BLOCK_N, False)
            m_i, l_i, acc = _fwd_run(q, K, V, b, h, d, qs, m_i, l_i, acc, diagonal, end, N, W, skb, skn, skh, svb,
                                     svn, svh, qk_scale, BLOCK_N, True)
        l_i = tl.where(qs < N, l_i, 1.0)  # rows past the end are not stored (and never divide by zero)
        o = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + qs[:, None] * son + d[None, :], o.to(O.dtype.element_ty),
                 mask=(qs < N)[:, None])
        tl.store(LSE + bh * N + qs, m_i * qk_scale + tl.math.log2(l_i), mask=qs < N)  # base-2 log-sum-exp

    @triton.jit
    def _probs_and_grads(q, k, v, do, lse, delta, qs, ks, N, W, qk_scale, MASKED: tl.constexpr):
        """The tile's attention probabilities p (recomputed) and score gradients ds = p * (dp - delta), without
        the softmax scale: the kernels apply it once to the summed dq and dk."""
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_band(qs, ks, W), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        return p, (p * (dp - delta[:, None])).to(q.dtype)

    @triton.jit
    def _dkdv_run(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, bh, d, ks, start, stop, N, W, sqb, sqn, sqh, sdb, sdn,
                  sdh, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
        """dk and dv of one key tile, accumulated over query tiles start, start+BLOCK_M, ... < stop. It works on
        the transposed tile (keys x queries): p^T and ds^T come out of their dots in the layout the next dots
        take as their first operand, so nothing is transposed in registers (through shared memory)."""
        for m0 in range(start, stop, BLOCK_M):
            qs = m0 + tl.arange(0, BLOCK_M)
            q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
            do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
            if MASKED:  # unmasked tiles hold only queries before N
                lse = tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0)
                delta = tl.load(DELTA + bh * N + qs, mask=qs < N, other=0.0)
            else:
                lse = tl.load(LSE + bh * N + qs)
                delta = tl.load(DELTA + bh * N + qs)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (keys, queries)
            if MASKED:
                pt = tl.where(_band(qs, ks, W).trans(), pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # unscaled: dk is scaled once, when stored
            dk += tl.dot(dst, q)
        return dk, dv

    @triton.jit
    def _band_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                       sdb, sdn, sdh, sgb, sgn, sgh, qk_scale, scale, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, D: tl.constexpr, ONE_LOOP: tl.constexpr):
        n0, bh, b, h, ks, d = _this_tile(H, BLOCK_N, D)
        k = _tile(K, b, h, ks, d, N, skb, skn, skh)
        v = _tile(V, b, h, ks, d, N, svb, svn, svh)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        start, inner, outer, end = _query_tile_phases(n0, N, W, BLOCK_M, BLOCK_N)
        if ONE_LOOP:
            dk, dv = _dkdv_run(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, bh, d, ks, start, end, N, W, sqb, sqn, sqh,
                               sdb, sdn, sdh, qk_scale, BLOCK_M, True)
        else:
            dk, dv = _dkdv_run(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, bh, d, ks, start, inner, N, W, sqb, sqn, sqh,
                               sdb, sdn, sdh, qk_scale, BLOCK_M, True)
            dk, dv = _dkdv_run(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, bh, d, ks, inner, outer, N, W, sqb, sqn, sqh,
                               sdb, sdn, sdh, qk_scale, BLOCK_M, False)
            dk, dv = _dkdv_run(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, bh, d, ks, outer, end, N, W, sqb, sqn, sqh,
                               sdb, sdn, sdh, qk_scale, BLOCK_M, True)
        out = b * sgb + h * sgh + ks[:, None] * sgn + d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=(ks < N)[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=(ks < N)[:, None])

    @triton.jit
    def _dq_run(q, do, lse, delta, K, V, dq, b, h, d, qs, start, stop, N, W, skb, skn, skh, svb, svn, svh,
                qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """dq of one query tile, accumulated over key tiles start, start+BLOCK_N, ... < stop."""
        for n0 in range(start, stop, BLOCK_N):
            ks = n0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            _, ds = _probs_and_grads(q, k, _tile(V, b, h, ks, d, N, svb, svn, svh), do, lse, delta, qs, ks, N, W,
                                     qk_scale, MASKED)
            dq += tl.dot(ds, k)
        return dq

    @triton.jit
    def _band_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, N, W, H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                     sob, son, soh, sdb, sdn, sdh, sgb, sgn, sgh, qk_scale, scale, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D: tl.constexpr, ONE_LOOP: tl.constexpr):
        """dq of one query tile; it also computes and stores delta = rowsum(o * do) of its queries, which
        the dk/dv kernel (launched after it) reads."""
        m0, bh, b, h, qs, d = _this_tile(H, BLOCK_M, D)
        q = _tile(Q, b, h, qs, d, N, sqb, sqn, sqh)
        do = _tile(DO, b, h, qs, d, N, sdb, sdn, sdh)
        o = _tile(O, b, h, qs, d, N, sob, son, soh)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * N + qs, delta, mask=qs < N)
        lse = tl.load(LSE + bh * N + qs, mask=qs < N, other=0.0)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        lo, inner, diagonal, end = _key_tile_phases(m0, N, W, BLOCK_M, BLOCK_N)
        if ONE_LOOP:
            dq = _dq_run(q, do, lse, delta, K, V, dq, b, h, d, qs, lo, end, N, W, skb, skn, skh, svb, svn, svh,
                         qk_scale, BLOCK_N, True)
        else:
            dq = _dq_run(q, do, lse, delta, K, V, dq, b, h, d, qs, lo, inner, N, W, skb, skn, skh, svb, svn, svh,
                         qk_scale, BLOCK_N, True)
            dq = _dq_run(q, do, lse, delta, K, V, dq, b, h, d, qs, inner, diagonal, N, W, skb, skn, skh, svb, svn,
                         svh, qk_scale, BLOCK_N, False)
            dq = _dq_run(q, do, lse, delta, K, V, dq, b, h, d, qs, diagonal, end, N, W, skb, skn, skh, svb, svn,
                         svh, qk_scale, BLOCK_N, True)
        tl.store(DQ + b * sgb + h * sgh + qs[:, None] * sgn + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=(qs < N)[:, None])

    @triton.jit
    def _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, N, W, qk_scale):
        """One (query tile, key tile) pair of the strip backward: its share of dq, dk (both without the softmax
        scale, applied when they are stored) and dv. It works on the transposed tile (keys x queries), as
        _dkdv_run: only ds is transposed in registers, for dq."""
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        pt = tl.where(_band(qs, ks, W).trans(), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q)
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
            dq, dk, dv = _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, N, W, qk_scale)
            _store_key_grads(DK, DV, dk, dv, b, h, ks, d, first, N, sgb, sgn, sgh, scale)  # key tile i-1 is complete
            ks = qs
            k = _tile(K, b, h, ks, d, N, skb, skn, skh)
            v = _tile(V, b, h, ks, d, N, svb, svn, svh)
            dk = tl.zeros((BLOCK, D), tl.float32)
            dv = tl.zeros((BLOCK, D), tl.float32)
            dq, dk, dv = _strip_pair(q, do, lse, delta, k, v, dq, dk, dv, qs, ks, N, W, qk_scale)
            tl.store(DQ + b * sgb + h * sgh + qs[:, None] * sgn + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                     mask=(qs < N)[:, None])
        qs = stop + tl.arange(0, BLOCK)  # the next strip's first query tile: its share of the last key tile
        q, do, lse, delta = _strip_queries(Q, O, DO, LSE, b, h, bh, qs, d, N, sqb, sqn, sqh, sob, son, soh,
                                           sdb, sdn, sdh)
        _, dk, dv = _strip_pair(q, do, lse, delta, k, v, tl.zeros((BLOCK, D), tl.float32), dk, dv, qs, ks, N, W,
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
                                           ONE_LOOP="fwd" in LAUNCH["one_loop"], **compile_options(*options))
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
                                              BLOCK_M=bm, BLOCK_N=bn, D=D, ONE_LOOP="dq" in LAUNCH["one_loop"],
                                              **compile_options(*options))
    bm, bn, *options = LAUNCH["dkdv"]  # one program per key tile
    _band_bwd_dkdv[(triton.cdiv(N, bn), B * H)](q, k, v, grad_out, lse, delta, dk, dv, N, window, H,
                                                *_bnh(q), *_bnh(k), *_bnh(v), *_bnh(grad_out), *_bnh(dk), *scales,
                                                BLOCK_M=bm, BLOCK_N=bn, D=D, ONE_LOOP="dkdv" in LAUNCH["one_loop"],
                                                **compile_options(*options))


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
