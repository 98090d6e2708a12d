"""The MLP backward's first GEMM with the GELU backward in its epilogue: a Triton GEMM on TMA.

In the backward of proj(gelu_tanh(h)), cuBLAS writes dg = dy @ proj_weight (M x F, F = 4C), then an
elementwise kernel reads dg and h again and writes dh = dg * gelu_tanh'(h): at 32768 x 2048 in bf16 that
pass moves 384 MB beside a GEMM of 69 GFLOP. Here one kernel computes each output tile of dy @ proj_weight in
fp32, loads the same tile of h, and writes only dh. Operands travel by TMA (tensor descriptors), and gelu'
takes its tanh from the GPU's tanh.approx.f32 instead of an exp and a division (the epilogue runs after the
tile's matmul, so its cost adds to the kernel's; the division alone made it 0.037 ms slower at that size).

H200, 32768 x 2048 x 512 (`scripts/benchmark.py dgelu`, benchmarks/h200i/fused_mlp/dgelu.md): 0.180 ms,
against 0.216 ms for cuBLAS (0.114) plus Inductor's elementwise kernel; 0.136 vs 0.164 ms at 24576 rows,
0.292 vs 0.322 ms at 16384 x 4096 x 1024. Persistent programs, column halves in the epilogue, h read before
the K loop and other tiles are there as Launch settings, measured slower. An earlier pointer-based version
(commit 798af8d, removed after) took 0.29 ms. With gelu' in 9 multiplies/FMAs: 0.170-0.172 ms
(benchmarks/h200k). On Hopper the model calls imagegen.dgelu_pingpong's Gluon kernel instead (0.145 ms: its
epilogue overlaps the matmul), this one where that cannot run or fails (LAUNCH).

    dh = matmul_dgelu(dy, proj_weight, h)      # dy (M, C), proj_weight (C, F), h (M, F) -> (M, F)

Runs on CUDA GPUs with TMA (compute capability 9.0 or newer) in bf16/fp16, with contiguous operands and C a
multiple of 64 and F of 8 (`matmul_dgelu_runs`); its exactness is tested in Triton's CPU interpreter (fp32,
exact tanh) and on the GPU. Model option: `model.mlp_backend=fused` (imagegen.gelu_mlp).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None



class Launch(NamedTuple):
    """How matmul_dgelu launches: tile sizes, warps and pipeline stages; epilogue halves (store a tile in two
    column halves: fewer registers and shared memory at a time); programs per SM (0: one program per output
    tile, else persistent programs walking the tiles) and warp specialization (persistent only); prefetch_h: load
    the tile of h into registers before the GEMM's K loop (one program per tile, halves 1), so the load overlaps
    the matmul; fast_tanh: gelu' through the GPU's tanh.approx.f32 (on CUDA; relative error about 2^-11, below
    bf16's rounding) instead of exp and a division; pingpong: imagegen.dgelu_pingpong's Gluon kernel instead
    (two consumer warpgroups per SM taking turns; its own fixed tiles and fast tanh, the other fields unused)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    warps: int = 8
    stages: int = 3
    halves: int = 1
    per_sm: int = 0
    warp_specialize: bool = False
    prefetch_h: bool = False
    fast_tanh: bool = False
    pingpong: bool = False


# The model's: the Gluon ping-pong kernel (imagegen.dgelu_pingpong) on Hopper, this module's Triton kernel on
# other GPUs or if the first fails
LAUNCH = {"matmul": Launch(pingpong=True, fast_tanh=True), "fallback": Launch(fast_tanh=True)}
LAUNCH_CHOICES = [Launch(), Launch(fast_tanh=True), Launch(stages=2, fast_tanh=True),
                  Launch(stages=2, halves=2, fast_tanh=True), Launch(warps=4, fast_tanh=True),
                  Launch(warps=4, stages=2, fast_tanh=True), Launch(stages=4, fast_tanh=True),
                  Launch(halves=2, fast_tanh=True), Launch(block_n=256, fast_tanh=True),
                  Launch(block_m=64, block_n=256, warps=4, fast_tanh=True), Launch(group_m=4, fast_tanh=True),
                  Launch(stages=2, halves=2, per_sm=2, fast_tanh=True),
                  Launch(block_n=256, halves=2, per_sm=1, fast_tanh=True), Launch(warps=4, prefetch_h=True, fast_tanh=True),
                  # settings with room for two or more programs per SM (measured slower, benchmarks/h200k):
                  Launch(block_m=64, warps=4, fast_tanh=True), Launch(block_m=64, warps=4, stages=2, fast_tanh=True),
                  Launch(stages=2, prefetch_h=True, fast_tanh=True),
                  Launch(block_m=64, block_n=64, warps=4, fast_tanh=True), Launch(block_n=64, warps=4, fast_tanh=True),
                  Launch(block_m=64, warps=4, per_sm=2, fast_tanh=True),
                  Launch(pingpong=True, fast_tanh=True)]

RESOURCES: dict[Launch, dict] = {}  # what each launch setting compiled to (per thread, per program), once run

GELU_BETA = math.sqrt(2.0 / math.pi)  # gelu_tanh(x) = x/2 (1 + tanh(GELU_BETA (x + GELU_KAPPA x^3)))
GELU_KAPPA = 0.044715


def _operands_fit(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> bool:
    """dy (M, K), w (K, N), h (M, N): one dtype, contiguous, K a multiple of the K tile (64), N of 8 (TMA's
    16-byte row alignment)."""
    return (w.dtype == h.dtype == dy.dtype and dy.dim() == w.dim() == h.dim() == 2
            and all(t.is_contiguous() for t in (dy, w, h)) and dy.shape[1] == w.shape[0]
            and h.shape == (dy.shape[0], w.shape[1]) and dy.shape[1] % 64 == 0 and w.shape[1] % 8 == 0)


def matmul_dgelu_runs(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether matmul_dgelu takes these operands: a CUDA GPU with TMA, bf16/fp16, and _operands_fit."""
    return (triton is not None and dy.is_cuda and torch.cuda.get_device_capability(dy.device)[0] >= 9
            and dy.dtype in (torch.float16, torch.bfloat16) and _operands_fit(dy, w, h))


if triton is not None:
    _BETA, _BETA_KAPPA = tl.constexpr(GELU_BETA), tl.constexpr(GELU_BETA * GELU_KAPPA)
    _HALF_BETA, _HALF_3_BETA_KAPPA = tl.constexpr(GELU_BETA / 2), tl.constexpr(1.5 * GELU_BETA * GELU_KAPPA)

    @triton.jit
    def _gelu_tanh_grad(x, FAST_TANH: tl.constexpr):
        """d gelu_tanh(x) / dx in fp32 (aten's gelu_backward with approximate='tanh'), in 9 multiplies and
        fused multiply-adds besides the tanh: with t = tanh(x (b + b k x^2)), it is
        (1 - t^2) * x (b/2 + 3 b k/2 x^2) + (1/2 + t/2)."""
        x2 = x * x
        inner = x * (_BETA + _BETA_KAPPA * x2)
        if FAST_TANH:  # one special-function instruction instead of an exp and a division
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh(inner), exact at both infinities
        return (1.0 - t * t) * (x * (_HALF_BETA + _HALF_3_BETA_KAPPA * x2)) + (0.5 + 0.5 * t)

    @triton.jit
    def _tile_origin(tile, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The first row and column of output tile number `tile`: GROUP_M row tiles walk the columns together
        (so the programs running at once share tiles of B in L2)."""
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * tiles_n)) % group_size
        pid_n = (tile % (GROUP_M * tiles_n)) // group_size
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @triton.jit
    def _epilogue_half(acc, h_desc, out_desc, row, col, DGELU: tl.constexpr, FAST_TANH: tl.constexpr):
        """Store acc (fp32) * gelu_tanh'(h) for the h tile at (row, col) (acc alone without DGELU)."""
        if DGELU:
            acc = acc * _gelu_tanh_grad(h_desc.load([row, col]).to(tl.float32), FAST_TANH)
        out_desc.store([row, col], acc.to(out_desc.dtype))

    @triton.jit
    def _epilogue(acc, h_desc, out_desc, row, col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HALVES: tl.constexpr, DGELU: tl.constexpr, FAST_TANH: tl.constexpr):
        """Store the tile at (row, col): acc * gelu_tanh'(h), or acc itself without DGELU, in HALVES column
        halves (fewer registers and shared memory at a time)."""
        if HALVES == 2:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)  # (BLOCK_M, BLOCK_N // 2) each
            _epilogue_half(left, h_desc, out_desc, row, col, DGELU, FAST_TANH)
            _epilogue_half(right, h_desc, out_desc, row, col + BLOCK_N // 2, DGELU, FAST_TANH)
        else:
            _epilogue_half(acc, h_desc, out_desc, row, col, DGELU, FAST_TANH)

    @triton.jit
    def _matmul_dgelu(a_desc, b_desc, h_desc, out_desc, H, M, N, K, NUM_PROGRAMS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      HALVES: tl.constexpr, PERSISTENT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                      PREFETCH_H: tl.constexpr, FAST_TANH: tl.constexpr, DGELU: tl.constexpr):
        """OUT (M, N) = (A (M, K) @ B (K, N)) * gelu_tanh'(H (M, N)), all row-major, through tensor descriptors
        (blocks: A [BLOCK_M, BLOCK_K], B [BLOCK_K, BLOCK_N], H and OUT [BLOCK_M, BLOCK_N // HALVES]).
        PERSISTENT: NUM_PROGRAMS programs each take every NUM_PROGRAMS-th output tile; else one tile each.
        PREFETCH_H (one tile per program, HALVES 1): H (the same tensor as h_desc's) is read through pointers
        before the K loop, so the load is in flight during the matmul."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        first = tl.program_id(0)
        if PERSISTENT:
            # The epilogue's tile counter is kept apart from the loop's, so the flattened loop can prefetch ahead
            stored = first - NUM_PROGRAMS
            for tile in tl.range(first, tiles_m * tiles_n, NUM_PROGRAMS, flatten=True,
                                 warp_specialize=WARP_SPECIALIZE):
                row, col = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for ki in range(k_tiles):
                    acc = tl.dot(a_desc.load([row, ki * BLOCK_K]), b_desc.load([ki * BLOCK_K, col]), acc)
                stored += NUM_PROGRAMS
                row, col = _tile_origin(stored, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
                _epilogue(acc, h_desc, out_desc, row, col, BLOCK_M, BLOCK_N, HALVES, DGELU, FAST_TANH)
        else:
            row, col = _tile_origin(first, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            if PREFETCH_H:
                rows, cols = row + tl.arange(0, BLOCK_M), col + tl.arange(0, BLOCK_N)
                h = tl.load(H + rows[:, None].to(tl.int64) * N + cols[None, :],
                            mask=(rows < M)[:, None] & (cols < N)[None, :], other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for ki in range(k_tiles):
                acc = tl.dot(a_desc.load([row, ki * BLOCK_K]), b_desc.load([ki * BLOCK_K, col]), acc)
            if PREFETCH_H:
                if DGELU:
                    acc = acc * _gelu_tanh_grad(h.to(tl.float32), FAST_TANH)
                out_desc.store([row, col], acc.to(out_desc.dtype))
            else:
                _epilogue(acc, h_desc, out_desc, row, col, BLOCK_M, BLOCK_N, HALVES, DGELU, FAST_TANH)


def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _check_operands(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    if not _operands_fit(dy, w, h):  # (Triton's CPU interpreter also runs it, in fp32, for the tests)
        raise ValueError("matmul_dgelu needs contiguous operands dy (M, K), w (K, N), h (M, N) with K a multiple "
                         f"of 64 and N of 8; got {dy.dtype} {tuple(dy.shape)}, {w.dtype} {tuple(w.shape)}, "
                         f"{h.dtype} {tuple(h.shape)}")


def _launch(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor, launch: Launch | None = None,
            dgelu: bool = True) -> torch.Tensor:
    """The kernel of `launch` on operands its callers have checked (_check_operands)."""
    launch = launch or LAUNCH["matmul"]
    if launch.pingpong:
        from imagegen import dgelu_pingpong  # (it imports this module's constants)
        if dgelu_pingpong.pingpong_runs(dy):
            out, compiled = dgelu_pingpong.matmul_dgelu_pingpong(dy, w, h, dgelu)
            _note_resources(launch, compiled)
            return out
        launch = LAUNCH["fallback"]  # not a Hopper GPU, or no Gluon
    (M, K), N = dy.shape, w.shape[1]
    out = torch.empty_like(h)
    bm, bn, bk, halves, per_sm = launch.block_m, launch.block_n, launch.block_k, launch.halves, launch.per_sm
    if launch.prefetch_h and (per_sm or halves != 1):
        raise ValueError(f"prefetch_h needs one program per tile and halves 1: {launch}")
    a = TensorDescriptor.from_tensor(dy, [bm, bk])
    b = TensorDescriptor.from_tensor(w, [bk, bn])
    h_desc = TensorDescriptor.from_tensor(h, [bm, bn // halves])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn // halves])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(per_sm * _programs(dy.device), tiles) if per_sm else tiles
    compiled = _matmul_dgelu[(programs,)](
        a, b, h_desc, out_desc, h, M, N, K, NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=launch.group_m, HALVES=halves, PERSISTENT=per_sm > 0, WARP_SPECIALIZE=launch.warp_specialize,
        PREFETCH_H=launch.prefetch_h, FAST_TANH=launch.fast_tanh and dy.is_cuda, DGELU=dgelu,
        num_warps=launch.warps, num_stages=launch.stages)
    _note_resources(launch, compiled)
    return out


def _note_resources(launch: Launch, compiled) -> None:
    if launch not in RESOURCES and hasattr(compiled, "n_regs"):  # (once per setting; not in the interpreter)
        RESOURCES[launch] = {"registers": compiled.n_regs, "spills": compiled.n_spills,
                             "shared_kib": compiled.metadata.shared / 1024}


_failed: list[str] = []  # why LAUNCH's kernels would not run, in the order tried: later calls skip them


def _launch_or_fall_back(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """LAUNCH["matmul"] (the Gluon ping-pong kernel); if it fails (e.g. a Triton whose Gluon API differs), with a
    warning, LAUNCH["fallback"] (the Triton kernel) from then on; if that fails too, with another, the same result
    from torch.mm and aten's gelu_backward. Operands it cannot take are the caller's error (ValueError)."""
    _check_operands(dy, w, h)
    for launch in (LAUNCH["matmul"], LAUNCH["fallback"])[len(_failed):]:
        try:
            return _launch(dy, w, h, launch)
        except Exception as e:  # noqa: BLE001 (a compile error of Triton's own types among them)
            _failed.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            then = "trying imagegen.dgelu_matmul's Triton kernel" if len(_failed) == 1 else \
                "the MLP backward uses torch.mm and gelu_backward instead"
            warnings.warn(f"model.mlp_backend=fused: the gelu' GEMM {launch_label(launch)} failed ({_failed[-1]}); "
                          f"{then}", stacklevel=2)
    return torch.ops.aten.gelu_backward(torch.mm(dy, w), h, approximate="tanh")


def launch_label(launch: Launch) -> str:
    """The fields of a launch setting that differ from Launch's defaults (128 x 128 x 64 tiles, 8 warps, 3
    stages, one program per tile)."""
    changed = [f"{k}={v}" for k, v in launch._asdict().items() if v != Launch._field_defaults[k]]
    return " ".join(changed) or "defaults"


_op = torch.library.custom_op("imagegen::matmul_dgelu", _launch_or_fall_back, mutates_args=())


@_op.register_fake
def _(dy, w, h):
    return torch.empty_like(h)


def matmul_dgelu(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor, custom_op: bool = False,
                 launch: Launch | None = None, dgelu: bool = True) -> torch.Tensor:
    """(dy @ w) * gelu_tanh'(h) in one kernel: dy (M, K), w (K, N), h (M, N) -> (M, N) in their dtype. custom_op:
    go through the custom op (opaque to the compiler; what a backward that torch.compile traces must call), else
    call directly. Either way with LAUNCH's setting it falls back to torch.mm and gelu_backward, with a warning,
    if the kernel fails. `launch` (an entry of LAUNCH_CHOICES) or dgelu=False (the GEMM alone, to time it)
    launch that exactly, without the fallback."""
    if custom_op:
        return _op(dy, w, h)
    if launch or not dgelu:
        _check_operands(dy, w, h)
        return _launch(dy, w, h, launch, dgelu)
    return _launch_or_fall_back(dy, w, h)
