"""The MLP backward's first GEMM with the GELU backward in its epilogue, as a Triton kernel.

In the backward of proj(gelu_tanh(h)), cuBLAS writes dg = dy @ proj_weight (M x 4C), then an elementwise
kernel reads dg and h again and writes dh = dg * gelu_tanh'(h): at 32768 x 2048 in bf16 that pass moves
384 MB for a GEMM of 69 GFLOP. Here one Triton GEMM computes the tile of dy @ proj_weight in fp32, reads
the same tile of h, and writes only dh (cuBLASLt's own DGELU epilogue ran as a separate, slower kernel on an
H200: imagegen.gelu_mlp).

    dh = matmul_dgelu(dy, proj_weight, h)      # dy (M, C), proj_weight (C, F), h (M, F) -> (M, F)

Runs on CUDA in bf16/fp16 with contiguous operands and C a multiple of the K tile (`matmul_dgelu_runs`);
its exactness is tested in Triton's CPU interpreter (fp32) and on the GPU. `scripts/benchmark.py mlp` times
it against cuBLAS + Inductor's elementwise kernel and each launch setting of LAUNCH_CHOICES.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, pipeline stages); `scripts/benchmark.py mlp` times LAUNCH_CHOICES
LAUNCH = {"matmul": (128, 256, 64, 8, 8, 3)}
LAUNCH_CHOICES = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
                  (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (64, 256, 64, 8, 4, 4)]

GELU_BETA = math.sqrt(2.0 / math.pi)  # gelu_tanh(x) = x/2 (1 + tanh(GELU_BETA (x + GELU_KAPPA x^3)))
GELU_KAPPA = 0.044715


def _operands_fit(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> bool:
    """dy (M, K), w (K, N), h (M, N): one dtype, contiguous, K a multiple of the K tile (64)."""
    return (w.dtype == h.dtype == dy.dtype and dy.dim() == w.dim() == h.dim() == 2
            and all(t.is_contiguous() for t in (dy, w, h)) and dy.shape[1] == w.shape[0]
            and h.shape == (dy.shape[0], w.shape[1]) and dy.shape[1] % 64 == 0)


def matmul_dgelu_runs(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether matmul_dgelu takes these operands: CUDA, bf16/fp16, and _operands_fit."""
    return triton is not None and dy.is_cuda and dy.dtype in (torch.float16, torch.bfloat16) and _operands_fit(dy, w, h)


if triton is not None:
    _BETA, _KAPPA = tl.constexpr(GELU_BETA), tl.constexpr(GELU_KAPPA)

    @triton.jit
    def _gelu_tanh_grad(x):
        """d gelu_tanh(x) / dx in fp32 (aten's gelu_backward with approximate='tanh')."""
        inner = _BETA * (x + _KAPPA * x * x * x)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh(inner), exact at both infinities
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _BETA * (1.0 + 3.0 * _KAPPA * x * x)

    @triton.jit
    def _matmul_dgelu(A, B, H, OUT, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """OUT (M, N) = (A (M, K) @ B (K, N)) * gelu_tanh'(H (M, N)), all row-major; K % BLOCK_K == 0."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)  # GROUP_M row tiles walk the columns together (L2 reuse of B)
        first_m = group * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
        pid_n = (pid % (GROUP_M * tiles_n)) // group_size
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = A + rows[:, None].to(tl.int64) * K + ks[None, :]
        b_ptrs = B + ks[:, None] * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(rows < M)[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=(cols < N)[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * N
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = tl.load(H + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(OUT + offsets, (acc * _gelu_tanh_grad(h)).to(OUT.dtype.element_ty), mask=inside)


def _launch(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not _operands_fit(dy, w, h):  # (Triton's CPU interpreter also runs it, in fp32, for the tests)
        raise ValueError("matmul_dgelu needs contiguous operands dy (M, K), w (K, N), h (M, N) with "
                         f"K a multiple of 64; got {dy.dtype} {tuple(dy.shape)}, {w.dtype} {tuple(w.shape)}, "
                         f"{h.dtype} {tuple(h.shape)}")
    (M, K), N = dy.shape, w.shape[1]
    out = torch.empty_like(h)
    bm, bn, bk, group, warps, stages = LAUNCH["matmul"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _matmul_dgelu[grid](dy, w, h, out, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                        num_warps=warps, num_stages=stages)
    return out


_op = torch.library.custom_op("imagegen::matmul_dgelu", _launch, mutates_args=())


@_op.register_fake
def _(dy, w, h):
    return torch.empty_like(h)


def matmul_dgelu(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor, custom_op: bool = False) -> torch.Tensor:
    """(dy @ w) * gelu_tanh'(h) in one kernel: dy (M, K), w (K, N), h (M, N) -> (M, N) in their dtype. custom_op:
    go through the custom op (opaque to the compiler; what a backward that torch.compile traces must call), else
    launch directly."""
    return _op(dy, w, h) if custom_op else _launch(dy, w, h)
