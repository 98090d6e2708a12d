"""The MLP's GELU GEMMs with their epilogues overlapped: Gluon kernels with two consumer warpgroups in ping-pong
(Hopper), for the backward's gelu' GEMM of imagegen.dgelu_matmul and the forward's h, gelu(h) GEMM of
imagegen.gelu_mlp.

In dgelu_matmul's Triton kernel every program runs its tile's matmul, then its epilogue (load the tile of h,
compute gelu', store dh), and the two programs that share an SM do so in step, so the tensor cores wait while
both run epilogues. Here each persistent program (one per SM) has three partitions (Gluon's warp specialization):
- a loader warp issues the TMA loads of A and B tiles into a ring of STAGES shared-memory slots, tile after
  tile in order;
- two consumer warpgroups take alternate tiles. Each (backward) starts the TMA load of its tile of h, waits for
  its turn (the other consumer has waited for all the slots of the tile before; a slot's barrier tells its rounds
  apart only by parity, so no consumer may run a round ahead), runs the wgmma K loop into its own 128 x 128 fp32
  accumulator, hands the turn over, then runs its epilogue: the backward multiplies by gelu'(h) and stores dh by
  TMA through the buffer h came in; the forward stores h, computes gelu(h) while h leaves, then stores it
  through the same buffer.
So one consumer's matmul runs while the other's epilogue does: the CUTLASS "ping-pong" schedule. The forward's
B is the fc weight as it is, (N, K): its tiles are loaded as (BN, BK) and handed to wgmma transposed.

H200, 32768 x 2048 x 512 (`scripts/pingpong_check.py`, benchmarks/h200k): the backward 0.145 ms against 0.170 ms
for dgelu_matmul's Triton kernel (its GEMM alone 0.112 ms, cuBLAS's 0.117); 0.112 vs 0.129 ms at 24576 rows.
Three stages instead of five: 0.166 ms. The forward at 24576 x 512 x 2048 (benchmarks/h200q/forward_pingpong):
0.1036 ms against 0.1087 ms for cuBLASLt's GELU_AUX epilogue (its plain GEMM 0.0746 ms). A second output buffer
per consumer (so gelu(h) need not wait for h to leave), with room made by K tiles of 32 and 6 stages, was slower
(0.1246 ms; the backward 0.1184 against 0.1131), and so were K tiles of 32 alone (0.1119, 0.1176; tried in a
working tree, not kept: benchmarks/h200q/forward_pingpong/pingpong_buffers.txt). Outputs stored from registers
(gl.store in the accumulator's layout, 32-bit stores) instead of through shared memory and TMA were slower still:
at 24576 rows the forward 0.1349 ms with gelu(h) so stored and 0.2052 with h as well, against 0.1020; the backward
0.1322 against 0.1131 (benchmarks/h200r/direct_stores, a working tree, not kept).

    dh, compiled = matmul_dgelu_pingpong(dy, w, h)      # dy (M, K), w (K, N), h (M, N) bf16/fp16 -> (M, N)
    g, h, compiled = matmul_gelu_pingpong(x, w1)         # x (M, K), w1 (N, K) -> gelu(x w1^T), x w1^T (M, N)

Runs on CUDA GPUs of compute capability 9.x with a Triton that has Gluon's Hopper API (`pingpong_runs`; written
for Triton 3.6, compiled for sm_90 by the CPU tests with the installed Triton). imagegen.dgelu_matmul calls it for
Launch(pingpong=True), its LAUNCH["matmul"], and falls back to its Triton kernel where it cannot run or fails;
imagegen.gelu_mlp calls the forward for model.mlp_backend=fused and falls back to cuBLASLt's GELU_AUX epilogue.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except (ImportError, AttributeError):  # no Triton, or one without Gluon's Hopper API
    gluon = None

BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M = 128, 128, 64, 5, 8
# Registers per thread: the kernel starts at MAX_REGISTERS in 3 warpgroups, then the loader's warpgroup gives up
# all but LOADER_REGISTERS, the second consumer takes CONSUMER_REGISTERS and the first the rest
MAX_REGISTERS, LOADER_REGISTERS, CONSUMER_REGISTERS = 168, 40, 232


def pingpong_runs(dy: torch.Tensor) -> bool:
    """Whether this kernel can run here: Gluon present and a Hopper GPU (wgmma; not Blackwell's tcgen05)."""
    return gluon is not None and dy.is_cuda and torch.cuda.get_device_capability(dy.device)[0] == 9


if gluon is not None:
    from imagegen.dgelu_matmul import GELU_BETA, GELU_KAPPA

    _BETA, _BETA_KAPPA = gl.constexpr(GELU_BETA), gl.constexpr(GELU_BETA * GELU_KAPPA)
    _HALF_BETA, _HALF_3_BETA_KAPPA = gl.constexpr(GELU_BETA / 2), gl.constexpr(1.5 * GELU_BETA * GELU_KAPPA)
    # The partition's warps wait for each other (a named barrier in a warp-specialized partition); Triton 3.6
    # calls it thread_barrier, later versions barrier
    _partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def _gelu_tanh_grad(x):
        """d gelu_tanh(x) / dx in fp32, tanh by tanh.approx.f32 (as dgelu_matmul's fast_tanh), the same
        arithmetic as dgelu_matmul's."""
        x2 = x * x
        inner = x * (_BETA + _BETA_KAPPA * x2)
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=gl.float32,
                                      is_pure=True, pack=1)
        return (1.0 - t * t) * (x * (_HALF_BETA + _HALF_3_BETA_KAPPA * x2)) + (0.5 + 0.5 * t)

    @gluon.jit
    def _gelu_tanh(x):
        """gelu_tanh(x) = x (1/2 + 1/2 tanh(x (b + b k x^2))) in fp32, tanh by tanh.approx.f32."""
        inner = x * (_BETA + _BETA_KAPPA * x * x)
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=gl.float32,
                                      is_pure=True, pack=1)
        return x * (0.5 + 0.5 * t)

    @gluon.jit
    def _tile_origin(tile, tiles_m, tiles_n, BM: gl.constexpr, BN: gl.constexpr, GM: gl.constexpr):
        """First row and column of output tile number `tile`, GM row tiles walking the columns together."""
        group = tile // (GM * tiles_n)
        first_m = group * GM
        group_size = gl.minimum(tiles_m - first_m, GM)
        pid_m = first_m + (tile % (GM * tiles_n)) % group_size
        pid_n = (tile % (GM * tiles_n)) // group_size
        return pid_m * BM, pid_n * BN

    @gluon.jit
    def _schedule(M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        """(tiles_m, tiles_n, k_tiles, how many tiles this program takes): program p takes tiles p, p + P, ..."""
        tiles_m, tiles_n, k_tiles = gl.cdiv(M, BM), gl.cdiv(N, BN), gl.cdiv(K, BK)
        return tiles_m, tiles_n, k_tiles, gl.cdiv(tiles_m * tiles_n - gl.program_id(0), gl.num_programs(0))

    @gluon.jit
    def _loader(descs, bufs, bars, M, N, K, WHICH: gl.constexpr, GM: gl.constexpr, EPILOGUE: gl.constexpr,
                B_NK: gl.constexpr):
        """Fill the ring with A and B tiles for this program's tiles, in order (B's as (BN, BK) tiles of an (N, K)
        matrix when B_NK; WHICH and EPILOGUE unused: the workers share one signature)."""
        a_desc, b_desc, h_desc, _ = descs
        a_bufs, b_bufs, _ = bufs
        ready, empty, _, _ = bars
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = h_desc.block_type.shape[1]
        NUM_STAGES: gl.constexpr = a_bufs.type.shape[0]
        tiles_m, tiles_n, k_tiles, mine = _schedule(M, N, K, BM, BN, BK)
        pid, programs = gl.program_id(0), gl.num_programs(0)
        for j in range(mine):
            row, col = _tile_origin(pid + j * programs, tiles_m, tiles_n, BM, BN, GM)
            for kk in range(k_tiles):
                g = j * k_tiles + kk
                slot = g % NUM_STAGES
                mbarrier.wait(empty.index(slot), ((g // NUM_STAGES) & 1) ^ 1)  # (empty bars start "complete")
                mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [row, kk * BK], ready.index(slot), a_bufs.index(slot))
                if B_NK:
                    tma.async_copy_global_to_shared(b_desc, [col, kk * BK], ready.index(slot), b_bufs.index(slot))
                else:
                    tma.async_copy_global_to_shared(b_desc, [kk * BK, col], ready.index(slot), b_bufs.index(slot))

    @gluon.jit
    def _b_tile(b_bufs, slot, B_NK: gl.constexpr):
        """Ring slot `slot` of B as the (BK, BN) operand of wgmma (a transposed view of a (BN, BK) tile)."""
        return b_bufs.index(slot).permute((1, 0)) if B_NK else b_bufs.index(slot)

    @gluon.jit
    def _store_tile(tile, tile_buf, desc, row, col):
        """The (BM, BN) register tile out to `desc` at (row, col) through tile_buf (free: the caller waited)."""
        _partition_barrier()  # every warp is done with tile_buf (and knows it is free)
        tile_buf.store(tile)
        fence_async_shared()
        _partition_barrier()
        tma.async_copy_shared_to_global(desc, [row, col], tile_buf)

    @gluon.jit
    def _consumer(descs, bufs, bars, M, N, K, WHICH: gl.constexpr, GM: gl.constexpr, EPILOGUE: gl.constexpr,
                  B_NK: gl.constexpr):
        """Tiles WHICH, WHICH + 2, ... of this program: wgmma over the ring's slots, then the epilogue out through
        shared memory: "dgelu" dh = acc * gelu'(h); "gelu" h = acc, then gelu(acc); "plain" acc itself."""
        a_desc, _, h_desc, out_desc = descs
        a_bufs, b_bufs, tile_bufs = bufs
        ready, empty, h_bars, turns = bars
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = h_desc.block_type.shape[1]
        NUM_STAGES: gl.constexpr = a_bufs.type.shape[0]
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BN, 16])
        tiles_m, tiles_n, k_tiles, mine = _schedule(M, N, K, BM, BN, BK)
        pid, programs = gl.program_id(0), gl.num_programs(0)
        tile_buf, h_bar = tile_bufs.index(WHICH), h_bars.index(WHICH)  # h in (dgelu), then the output
        for j in range(WHICH, mine, 2):
            row, col = _tile_origin(pid + j * programs, tiles_m, tiles_n, BM, BN, GM)
            if EPILOGUE == "dgelu":  # the tile of h, in flight during the matmul
                tma.store_wait(pendings=0)  # the previous tile's dh has left tile_buf ...
                _partition_barrier()  # ... and every warp knows
                mbarrier.expect(h_bar, h_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(h_desc, [row, col], h_bar, tile_buf)
            # Wait for the other consumer's matmul of the tile before: a slot's barrier tells phases apart only
            # by parity, so a consumer must not wait on slots more than one round ahead of the loader
            if WHICH == 0:
                mbarrier.wait(turns.index(0), ((j // 2) - 1) & 1, pred=j > 0)
            else:
                mbarrier.wait(turns.index(1), (j // 2) & 1)
            acc = gl.zeros((BM, BN), gl.float32, mma_layout)
            g = j * k_tiles
            slot = g % NUM_STAGES
            mbarrier.wait(ready.index(slot), (g // NUM_STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), _b_tile(b_bufs, slot, B_NK), acc, use_acc=False,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # (returns at once: a tensor to carry)
            for kk in range(1, k_tiles):
                g = j * k_tiles + kk
                slot = g % NUM_STAGES
                mbarrier.wait(ready.index(slot), (g // NUM_STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(slot), _b_tile(b_bufs, slot, B_NK), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # the previous slot's MMA is done
                mbarrier.arrive(empty.index((g - 1) % NUM_STAGES), count=1)
            mbarrier.arrive(turns.index(1 - WHICH), count=1)  # all slots waited for: the other consumer's turn
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((j * k_tiles + k_tiles - 1) % NUM_STAGES), count=1)
            if EPILOGUE == "dgelu":  # dh = acc * gelu'(h), out through the buffer h came in
                mbarrier.wait(h_bar, (j // 2) & 1)
                acc = acc * _gelu_tanh_grad(tile_buf.load(mma_layout).to(gl.float32))
            else:
                tma.store_wait(pendings=0)  # the previous tile's output has left tile_buf
                if EPILOGUE == "gelu":  # h = acc out first; gelu(acc) computed while it leaves
                    _store_tile(acc.to(h_desc.dtype), tile_buf, h_desc, row, col)
                    acc = _gelu_tanh(acc)
                    tma.store_wait(pendings=0)
            _store_tile(acc.to(out_desc.dtype), tile_buf, out_desc, row, col)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _matmul_pingpong(a_desc, b_desc, h_desc, out_desc, M, N, K, NUM_STAGES: gl.constexpr, GM: gl.constexpr,
                         EPILOGUE: gl.constexpr, B_NK: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         LOADER_REGS: gl.constexpr):
        """C = A (M, K) @ B (K, N), B given as (N, K) when B_NK; persistent, one program per SM. EPILOGUE
        "dgelu": OUT = C * gelu_tanh'(H); "gelu": H = C and OUT = gelu_tanh(C); "plain": OUT = C (all (M, N))."""
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
        tile_bufs = gl.allocate_shared_memory(dtype, [2] + h_desc.block_type.shape, h_desc.layout)  # per consumer
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        h_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(h_bars.index(i), count=1)
            mbarrier.init(turns.index(i), count=1)
        descs = (a_desc, b_desc, h_desc, out_desc)
        bufs = (a_bufs, b_bufs, tile_bufs)
        bars = (ready, empty, h_bars, turns)
        gl.warp_specialize([
            (_consumer, (descs, bufs, bars, M, N, K, 0, GM, EPILOGUE, B_NK)),
            (_consumer, (descs, bufs, bars, M, N, K, 1, GM, EPILOGUE, B_NK)),
            (_loader, (descs, bufs, bars, M, N, K, 0, GM, EPILOGUE, B_NK)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, out: torch.Tensor, epilogue: str, b_nk: bool,
            programs: int):
    """_matmul_pingpong on a (M, K), b ((N, K) when b_nk, else (K, N)), h and out (M, N); returns the compiled
    kernel."""
    M, N = out.shape
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    grid = min(programs or torch.cuda.get_device_properties(a.device).multi_processor_count, tiles)
    return _matmul_pingpong[(grid,)](desc(a, [BLOCK_M, BLOCK_K]),
                                     desc(b, [BLOCK_N, BLOCK_K] if b_nk else [BLOCK_K, BLOCK_N]),
                                     desc(h, [BLOCK_M, BLOCK_N]), desc(out, [BLOCK_M, BLOCK_N]), M, N, a.shape[1],
                                     NUM_STAGES=STAGES, GM=GROUP_M, EPILOGUE=epilogue, B_NK=b_nk,
                                     CONSUMER_REGS=CONSUMER_REGISTERS, LOADER_REGS=LOADER_REGISTERS, num_warps=4,
                                     maxnreg=MAX_REGISTERS)


def matmul_dgelu_pingpong(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor, dgelu: bool = True,
                          programs: int = 0):
    """(dy @ w) * gelu_tanh'(h) (dy @ w alone without dgelu): dy (M, K), w (K, N), h (M, N) contiguous, one
    16-bit dtype, K a multiple of 64 and N of 8 (checked by the caller, imagegen.dgelu_matmul); `programs`
    (default: one per SM). Returns (the output, the compiled kernel)."""
    out = torch.empty_like(h)
    return out, _launch(dy, w, h, out, "dgelu" if dgelu else "plain", False, programs)


def matmul_gelu_pingpong(x: torch.Tensor, w: torch.Tensor, programs: int = 0):
    """The MLP's first GEMM with GELU: h = x @ w^T and g = gelu_tanh(h) (from the fp32 product, as cuBLASLt's
    GELU_AUX epilogue): x (M, K), w (N, K) contiguous, one 16-bit dtype, K a multiple of 64 and N of 8 (checked
    by the caller, imagegen.gelu_mlp). Returns (g, h, the compiled kernel)."""
    M, N = x.shape[0], w.shape[0]
    g, h = (torch.empty(M, N, dtype=x.dtype, device=x.device) for _ in range(2))
    return g, h, _launch(x, w, h, g, "gelu", True, programs)
