"""The transformer MLP, proj(gelu_tanh(fc(x))), with its GELU fused into two Triton GEMMs.

Unfused, the GELU costs two memory-bound passes over the (tokens, 4C) hidden tensor per layer: the forward
reads h = fc(x) and writes gelu(h); the backward reads h and d gelu(h), writes dh and (recomputing it) gelu(h)
for the weight gradient. On an H200 those two passes were 2.4 ms of a 21 ms sparse training step at
4096 x 8 (`scripts/benchmark.py profile`). Here:

- forward: one Triton GEMM h = x @ W1^T writes h and gelu(h) from its epilogue; cuBLAS y = gelu(h) @ W2^T;
- backward: cuBLAS dW2 = dy^T gelu(h); one Triton GEMM dy @ W2 multiplies by gelu'(h) in its epilogue and
  writes dh; cuBLAS dW1 = dh^T x and dx = dh W1.

h is rounded to the compute dtype before the GELU, as in the unfused path; the backward's epilogue applies
gelu'(h) to the fp32 accumulator (the unfused path rounds dy @ W2 to bf16 first).

    y = gelu_mlp(x, fc_weight, proj_weight)    # (..., C) -> (..., C); fc_weight (4C, C), proj_weight (C, 4C)

Runs on CUDA in bf16/fp16 (`gelu_mlp_runs`; under autocast the inputs are cast to the autocast dtype, as
F.linear would). Under torch.compile the two halves are custom ops (opaque to the compiler, with fake
shapes and a registered backward); eager calls go through an autograd.Function. The kernels' exactness is
tested in Triton's CPU interpreter (fp32) and on the GPU; `scripts/benchmark.py mlp` times them against
the unfused MLP. Model option: `model.mlp_backend=triton`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_K = 64

# Launch settings tried by Triton's autotuner on the first call of each shape: (BLOCK_M, BLOCK_N, warps, stages).
CONFIGS = [(128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 256, 8, 4), (256, 128, 8, 4),
           (128, 64, 4, 4), (64, 128, 4, 4)]


def gelu_mlp_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether the fused kernels take this input: CUDA, Triton, a bf16/fp16 compute dtype, a width that is a
    multiple of BLOCK_K and a hidden width (4C) that is a multiple of the widest tile."""
    if triton is None or not x.is_cuda:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    widest = max(bn for _, bn, _, _ in CONFIGS)
    return dtype in (torch.float16, torch.bfloat16) and x.shape[-1] % BLOCK_K == 0 and hidden % widest == 0


if triton is not None:

    @triton.jit
    def _tanh_of_gelu(h):
        """tanh(sqrt(2/pi) (h + 0.044715 h^3)) in fp32, through exp (libdevice is not in the CPU interpreter;
        exp overflowing to inf gives 1)."""
        return 1.0 - 2.0 / (tl.exp(1.5957691216057308 * (h + 0.044715 * h * h * h)) + 1.0)

    @triton.jit
    def _gelu(h):
        """gelu_tanh(h) = h/2 (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))."""
        return 0.5 * h * (1.0 + _tanh_of_gelu(h))

    @triton.jit
    def _gelu_slope(h):
        """d gelu_tanh(h) / dh."""
        t = _tanh_of_gelu(h)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)

    @triton.jit
    def _gemm_gelu(A, B, OUT, H, G, M, N, K, sam, sak, sbk, sbn, som, son,
                   BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
        """acc = A (M, K) @ B (K, N) in fp32, one (BLOCK_M, BLOCK_N) tile per program (K % BLOCK_K == 0).
        Forward: OUT = h = acc in the output dtype, G = gelu_tanh(h). Backward: OUT = acc * gelu_tanh'(H)."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)  # GROUP_M row tiles sweep the columns together (L2 reuse of B)
        first_m = group * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        am = rm % M  # rows past M read row (i mod M) instead of masking the loads: they are never stored
        a_ptrs = A + am[:, None] * sam + rk[None, :] * sak
        b_ptrs = B + rk[:, None] * sbk + rn[None, :] * sbn  # N % BLOCK_N == 0 (gelu_mlp_runs)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K * sak
            b_ptrs += BLOCK_K * sbk
        offsets = rm[:, None] * som + rn[None, :] * son  # OUT, H and G share their strides
        inside = (rm < M)[:, None] & (rn < N)[None, :]  # (rn < N always: it keeps the mask's shape simple)
        if BACKWARD:
            h = tl.load(H + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(OUT + offsets, (acc * _gelu_slope(h)).to(OUT.dtype.element_ty), mask=inside)
        else:
            h_out = acc.to(OUT.dtype.element_ty)
            tl.store(OUT + offsets, h_out, mask=inside)
            h = h_out.to(tl.float32)  # the GELU of the rounded h, as the unfused path computes it
            tl.store(G + offsets, _gelu(h).to(G.dtype.element_ty), mask=inside)

    _autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=w,
                               num_stages=s) for bm, bn, w, s in CONFIGS],
        key=["M", "N", "K", "BACKWARD"],
    )(_gemm_gelu)


def tuned_configs() -> dict[str, str]:
    """The launch setting the autotuner chose for each (M, N, K, backward) it has seen."""
    return {str(key): str(config) for key, config in _autotuned.cache.items()} if triton is not None else {}


# The launch settings used when not autotuning (Triton's CPU interpreter, tests): the first config.
AUTOTUNE = True


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, h: torch.Tensor | None, g: torch.Tensor | None,
            backward: bool) -> None:
    """out (M, N) = epilogue(a (M, K) @ b (K, N)); b may be a transposed view."""
    M, K = a.shape
    N = b.shape[1]
    h_arg = h if h is not None else out
    g_arg = g if g is not None else out
    args = (a, b, out, h_arg, g_arg, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1))
    if AUTOTUNE:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned[grid](*args, BACKWARD=backward)
    else:
        bm, bn, warps, stages = CONFIGS[0]
        _gemm_gelu[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](*args, BACKWARD=backward, BLOCK_M=bm, BLOCK_N=bn,
                                                            BLOCK_K=BLOCK_K, GROUP_M=8, num_warps=warps,
                                                            num_stages=stages)


def _forward_kernels(x: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, C), w1 (F, C), w2 (C, F) -> y (M, C), h (M, F), g = gelu(h) (M, F)."""
    M, F = x.shape[0], w1.shape[0]
    h = torch.empty(M, F, dtype=x.dtype, device=x.device)
    g = torch.empty_like(h)
    _launch(x, w1.t(), h, None, g, backward=False)
    return torch.mm(g, w2.t()), h, g


def _backward_kernels(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
                      g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, C), dw1 (F, C), dw2 (C, F)."""
    dy = dy.contiguous()
    dh = torch.empty_like(h)
    _launch(dy, w2, dh, h, None, backward=True)
    return torch.mm(dh, w1), torch.mm(dh.t(), x), torch.mm(dy.t(), g)


_forward_op = torch.library.custom_op("imagegen::gelu_mlp_fwd", _forward_kernels, mutates_args=())
_backward_op = torch.library.custom_op("imagegen::gelu_mlp_bwd", _backward_kernels, mutates_args=())


@_forward_op.register_fake
def _(x, w1, w2):
    hidden = x.new_empty(x.shape[0], w1.shape[0])
    return x.new_empty(x.shape[0], w2.shape[0]), hidden, torch.empty_like(hidden)


@_backward_op.register_fake
def _(dy, x, w1, w2, h, g):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, w2 = inputs
    _, h, g = output
    ctx.save_for_backward(x, w1, w2, h, g)
    ctx.mark_non_differentiable(h, g)


def _backward(ctx, dy, dh_unused, dg_unused):
    return _backward_op(dy, *ctx.saved_tensors)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGeluMLP(torch.autograd.Function):
    """The same launches without the custom ops, for eager calls (the dispatcher's host cost)."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        y, h, g = _forward_kernels(x, w1, w2)
        ctx.save_for_backward(x, w1, w2, h, g)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward_kernels(dy, *ctx.saved_tensors)


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor) -> torch.Tensor:
    """proj(gelu_tanh(fc(x))) for bias-free Linear weights fc_weight (F, C), proj_weight (C, F): (..., C) ->
    (..., C), in the autocast dtype when autocast is on (else x's dtype)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    shape = x.shape
    x2, w1, w2 = x.reshape(-1, shape[-1]).to(dtype).contiguous(), fc_weight.to(dtype), proj_weight.to(dtype)
    if torch.compiler.is_compiling():
        y = _forward_op(x2, w1, w2)[0]
    else:
        y = _EagerGeluMLP.apply(x2, w1, w2)
    return y.view(*shape[:-1], proj_weight.shape[0])
