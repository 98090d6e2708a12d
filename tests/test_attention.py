"""Every backend equals the reference (build_mask + masked SDPA): values and gradients, fp32 on CPU."""

import pytest
import torch
from conftest import COMPILE_FOR_HOPPER, run_python

from imagegen.attention import BACKENDS, Grid, attend, check_layout, supports
from imagegen.patterns import LayerSpec, PatternParams

GRIDS = [Grid(5, 7, 1), Grid(4, 3, 3), Grid(3, 16, 3), Grid(9, 9, 1)]  # N = 35, 36, 144, 81
SPECS = ["dense", "local", "column", "row", "strided", "fixed", "local|column", "column|local+column", "row|column"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(spec, grid, params, backend, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = attend(q, k, v, LayerSpec.parse(spec), grid, params, backend)
    y.backward(torch.ones_like(y) + y.detach())  # a non-trivial upstream gradient
    return y.detach(), q.grad, k.grad, v.grad


CPU_BACKENDS = [b for b in BACKENDS if b not in ("reference", "flex", "flash", "triton")]  # CUDA only
CASES = [(spec, backend) for spec in SPECS for backend in CPU_BACKENDS
         if all(supports(backend, g) for g in LayerSpec.parse(spec).groups)]


def test_every_cpu_backend_has_cases():
    assert {b for _, b in CASES} == set(CPU_BACKENDS)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("spec,backend", CASES)
@pytest.mark.parametrize("rows", [1, 2])
def test_backend_equals_reference(grid, spec, backend, rows):
    torch.manual_seed(hash((str(grid), spec, backend, rows)) % 2**31)
    B, h, D = 2, 4, 8
    q, k, v = (torch.randn(B, grid.num_tokens, h, D) for _ in range(3))
    params = PatternParams(rows=rows)
    fast = run(spec, grid, params, backend, q, k, v)
    ref = run(spec, grid, params, "reference", q, k, v)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-4


def test_forced_backend_that_cannot_run_a_pattern_fails_early():
    with pytest.raises(ValueError, match="cannot run pattern 'local'"):
        check_layout([LayerSpec.parse("local")], "axial")
    with pytest.raises(ValueError, match="unknown attention backend"):
        check_layout([LayerSpec.parse("local")], "magic")


def test_flash_backend_refuses_a_cpu_tensor_clearly():
    q = torch.randn(1, 12, 2, 8)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        attend(q, q, q, LayerSpec.parse("local"), Grid(3, 4, 1), PatternParams(), "flash")


def _stand_in_flash_kernels():
    """CPU stand-ins with the FlashAttention varlen contract: (total, h, D) inputs split into sequences by
    cu_seq, sliding window (window - 1, 0); forward -> (out, logsumexp (h, total)); backward -> dq, dk, dv."""

    def attention(q, k, v, cu_seq, window):
        outs, lses = [], []
        for s, e in zip(cu_seq[:-1].tolist(), cu_seq[1:].tolist()):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (h, n, D)
            d = torch.arange(e - s)[:, None] - torch.arange(e - s)[None, :]
            scores = (qs @ ks.transpose(1, 2)) / q.shape[-1] ** 0.5
            scores = scores.masked_fill(~((d >= 0) & (d < window)), float("-inf"))
            outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
            lses.append(scores.logsumexp(-1))
        return torch.cat(outs), torch.cat(lses, dim=1)

    def forward(q, k, v, cu_seq, seq_len, window):
        return attention(q, k, v, cu_seq, window)

    def backward(grad_out, q, k, v, out, lse, cu_seq, seq_len, window):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            return torch.autograd.grad(attention(*leaves, cu_seq, window)[0], leaves, grad_out)

    return forward, backward


def test_window_attention_routes_kernel_outputs_and_gradients(monkeypatch):
    """The eager path of the flash `local` backend (FlashAttention itself is checked on the GPU): the
    (B*N, h, D) views, sequence starts, window and gradient order, against the reference, with the two
    kernel calls replaced by CPU stand-ins of the same contract."""
    from imagegen import window_attention as wa

    forward, backward = _stand_in_flash_kernels()
    monkeypatch.setattr(wa, "_flash_forward", forward)
    monkeypatch.setattr(wa, "_flash_backward", backward)
    grid, rows = Grid(4, 3, 3), 1
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 4, 8) for _ in range(3))
    ref = run("local", grid, PatternParams(rows=rows), "reference", q, k, v)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    y = wa.window_attention(q, k, v, window=rows * grid.row_len)
    y.backward(torch.ones_like(y) + y.detach())
    for a, b in zip((y.detach(), q.grad, k.grad, v.grad), ref):
        assert rel_err(a, b) < 1e-5


INTERPRETED_CHECK = r"""
import torch
from imagegen.attention import Grid
from imagegen.patterns import LayerSpec, PatternParams
from imagegen.attention import attend
from imagegen import band_attention as band
from imagegen.band_attention import band_attention
from imagegen.short_attention import short_causal_attention

torch.manual_seed(0)
worst = 0.0
for grid in (Grid(5, 7, 1), Grid(4, 3, 3), Grid(17, 2, 3), Grid(4, 25, 1)):
    B, h, D = 2, 4, 16
    H, L, N = grid.height, grid.row_len, grid.num_tokens
    base = [torch.randn(B, N, h, D) for _ in range(4)]
    for axis in ("column", "row"):
        for h0, h1 in ((0, 4), (1, 3)):  # all heads; a head slice (strided, as in per-head layouts)
            q, k, v = (t[:, :, h0:h1].clone().requires_grad_(True) for t in base[:3])
            hg = h1 - h0
            view = (lambda t: t.reshape(B, H, L, hg, D)) if axis == "column" else (lambda t: t.reshape(B * H, L, 1, hg, D))
            y = short_causal_attention(view(q), view(k), view(v)).view(B, N, hg, D)
            y.backward(base[3][:, :, h0:h1])
            qr, kr, vr = (t[:, :, h0:h1].clone().requires_grad_(True) for t in base[:3])
            yr = attend(qr, kr, vr, LayerSpec.parse(axis), grid, PatternParams(), "reference")
            yr.backward(base[3][:, :, h0:h1])
            for a, b in ((y, yr), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
                worst = max(worst, ((a - b).norm() / b.norm()).item())
    for rows, tiles, strip in ((1, (64, 64), (64, 1, 4, 2)), (2, (64, 64), (0, 0, 0, 0)),
                               (1, (128, 64), (0, 0, 0, 0)), (2, (64, 128), (64, 3, 4, 2))):
        # local: the band kernel on strided q, k, v views of one (B, N, 3, h, D) tensor, with the tile
        # shapes `scripts/benchmark.py tune` may choose; these windows fit one tile, so the backward is the
        # one-pass strip kernel (strips of 1 or 3 tiles) or, with it off, the dq and dk/dv kernels
        band.LAUNCH.update({kernel: (*tiles, 4, 2) for kernel in ("fwd", "dkdv", "dq")}, strip=strip)
        qkv = torch.stack(base[:3], 2).requires_grad_(True)
        y = band_attention(*qkv.unbind(2), window=rows * L)
        y.backward(base[3])
        qr, kr, vr = (t.clone().requires_grad_(True) for t in base[:3])
        yr = attend(qr, kr, vr, LayerSpec.parse("local"), grid, PatternParams(rows=rows), "reference")
        yr.backward(base[3])
        for a, b in zip((y, *qkv.grad.unbind(2)), (yr, qr.grad, kr.grad, vr.grad)):
            worst = max(worst, ((a - b).norm() / b.norm()).item())
# a window of 200 keys, wider than a tile: the dq and dk/dv kernels, with key tiles that end at a query tile's
# last query (not at multiples of BLOCK_N) or start at key 0, and query tiles past N
grid, B, h, D = Grid(7, 50, 1), 1, 2, 16
base = [torch.randn(B, grid.num_tokens, h, D) for _ in range(4)]
for tiles in ((64, 64), (128, 64), (64, 128), (128, 128)):
    band.LAUNCH.update({kernel: (*tiles, 4, 2) for kernel in ("fwd", "dkdv", "dq")})
    q, k, v = (t.clone().requires_grad_(True) for t in base[:3])
    y = band_attention(q, k, v, window=200)
    y.backward(base[3])
    qr, kr, vr = (t.clone().requires_grad_(True) for t in base[:3])
    yr = attend(qr, kr, vr, LayerSpec.parse("local"), grid, PatternParams(rows=4), "reference")
    yr.backward(base[3])
    for a, b in zip((y, q.grad, k.grad, v.grad), (yr, qr.grad, kr.grad, vr.grad)):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
# the custom ops that torch.compile sees (eager calls skip the dispatcher): same values and gradients
from imagegen import short_attention as short
column = lambda t: t.view(B, 7, 50, h, D)  # (B, N, h, D) -> sequences along the image's 7 rows
pairs = [(lambda q, k, v: band._forward(q, k, v, 200)[0], lambda q, k, v: band_attention(q, k, v, window=200)),
         (lambda q, k, v: short._forward(column(q), column(k), column(v))[0].view_as(q),
          lambda q, k, v: short_causal_attention(column(q), column(k), column(v)).view_as(q))]
for custom, eager in pairs:
    results = []
    for run in (custom, eager):
        q, k, v = (t.clone().requires_grad_(True) for t in base[:3])
        y = run(q, k, v)
        y.backward(base[3])
        results.append((y, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
# the packed forms (one (B, N, 3, h, D) projection in, one packed gradient out), eager and as custom ops:
# local with the one-pass backward (window 25) and the two kernels (window 50), column and row
band.LAUNCH.update({kernel: (64, 64, 4, 2) for kernel in ("fwd", "dkdv", "dq")}, strip=(64, 2, 4, 2))
grid = Grid(4, 25, 1)
base = [torch.randn(2, grid.num_tokens, 2, 16) for _ in range(4)]
packed_runs = [("local", PatternParams(rows=rows), lambda qkv, rows=rows: band.band_attention_packed(qkv, rows * 25),
                lambda qkv, rows=rows: band._forward_packed(qkv, rows * 25)[0]) for rows in (1, 2)]
packed_runs += [(axis, PatternParams(), lambda qkv, c=axis == "column": short.short_causal_attention_packed(qkv, 4, c),
                 lambda qkv, c=axis == "column": short._forward_packed(qkv, 4, c)[0]) for axis in ("column", "row")]
for pattern, params, *runs in packed_runs:
    qr, kr, vr = (t.clone().requires_grad_(True) for t in base[:3])
    yr = attend(qr, kr, vr, LayerSpec.parse(pattern), grid, params, "reference")
    yr.backward(base[3])
    for run in runs:
        qkv = torch.stack(base[:3], 2).requires_grad_(True)
        y = run(qkv)
        y.backward(base[3])
        assert qkv.grad.is_contiguous()
        for a, b in zip((y, *qkv.grad.unbind(2)), (yr, qr.grad, kr.grad, vr.grad)):
            worst = max(worst, ((a - b).norm() / b.norm()).item())
# torch.library.opcheck: each custom op's schema, fake (what torch.compile traces with) and autograd
# registration (imagegen.kernel_op) against its real run; it raises on a mismatch
q, k, v = (torch.randn(1, 50, 2, 16, requires_grad=True) for _ in range(3))
qkv = torch.randn(1, 50, 3, 2, 16, requires_grad=True)
rows5 = lambda t: t.view(1, 5, 10, 2, 16)  # noqa: E731
for op, args in [(band._forward, (q, k, v, 20)), (band._forward_packed, (qkv, 20)),
                 (short._forward, (rows5(q), rows5(k), rows5(v))), (short._forward_packed, (qkv, 5, True))]:
    torch.library.opcheck(op, args)
print("max rel err", worst)
assert worst < 1e-4, worst
"""


def test_triton_kernels_equal_reference_in_the_interpreter(triton_interpreter):
    """Our Triton kernels (column/row, local band; forward and backward; separate and packed q, k, v), run by
    Triton's CPU interpreter in fp32, equal the reference on odd grids, C = 3, rows = 2 and strided inputs, and
    their custom ops pass torch.library.opcheck. On the GPU: test_gpu.py."""
    assert "max rel err" in run_python(INTERPRETED_CHECK, TRITON_INTERPRET="1")


HOPPER_COMPILE = r"""
import inspect
from imagegen import band_attention as band, short_attention as short

def signature(kernel, constexprs):
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in ("scale", "qk_scale"):
            types[name] = "fp32"
        elif name.isupper() and name not in ("N", "W", "H", "S"):  # tensors
            types[name] = "*fp32" if name in ("LSE", "DELTA") else "*bf16"
        else:
            types[name] = "i32"
    return types

for kernel, constexprs in [(band._band_fwd, dict(BLOCK_M=64, BLOCK_N=128, D=64)),
                           (band._band_bwd_dkdv, dict(BLOCK_M=64, BLOCK_N=64, D=64)),
                           (band._band_bwd_dq, dict(BLOCK_M=128, BLOCK_N=64, D=64)),
                           (band._band_bwd_strip, dict(BLOCK=64, D=64)),
                           (short._short_fwd, dict(BLOCK_S=64, D=64)),
                           (short._short_bwd, dict(BLOCK_S=64, D=64))]:
    compiled = compile_for_hopper(kernel, signature(kernel, constexprs), constexprs, num_warps=4, num_stages=3)
    assert "cubin" in compiled.asm, kernel.fn.__name__
    print(kernel.fn.__name__, "compiled for sm_90")
"""


def test_triton_kernels_compile_for_hopper(tmp_path):
    """The interpreter runs kernels as Python, so code that real Triton rejects (e.g. starred arguments in a
    jit call) passes there; compiling each kernel for sm_90 to a cubin, which needs no GPU, catches it."""
    pytest.importorskip("triton")
    out = run_python(COMPILE_FOR_HOPPER + HOPPER_COMPILE, TRITON_CACHE_DIR=str(tmp_path))
    assert out.count("compiled for sm_90") == 6
