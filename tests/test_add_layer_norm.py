"""Residual add + LayerNorm with the one-pass backward (imagegen.add_layer_norm, model.norm_backend=fused), on a
CPU: values and gradients against F.layer_norm, the custom op, the Triton kernels in Triton's interpreter and
compiled for Hopper, the fallback, and the model option. In bf16 on a GPU: tests/test_gpu.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from imagegen import add_layer_norm as aln
from imagegen.model import ImageTransformer, ModelConfig


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("stream_used", [True, False], ids=["stream-used", "stream-unused"])
def test_add_layer_norm_values_and_gradients_equal_f_layer_norm(with_delta, stream_used):
    """s = x + delta and y = LN(s), and the gradients of x, delta, weight and bias, whether or not s itself is
    used afterwards (the last norm's stream is not)."""
    torch.manual_seed(0)
    x, delta = torch.randn(2, 9, 24, dtype=torch.float64) * 3, torch.randn(2, 9, 24, dtype=torch.float64)
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    dy, ds = torch.randn(2, 9, 24, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    results = []
    for fused in (True, False):
        leaves = _leaves(x, delta, w, b)
        s, y = aln.add_layer_norm(leaves[0], leaves[1] if with_delta else None, leaves[2], leaves[3], 1e-5,
                                  fused_backward=fused)
        ((y * dy).sum() + ((s * ds).sum() if stream_used else 0)).backward()
        results.append([s, y] + [t.grad for t in leaves])
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(results[0][1], F.layer_norm(x + delta if with_delta else x, (24,), w, b))


def test_add_layer_norm_gives_the_autocast_dtype_and_keeps_the_stream_dtype():
    x, delta = torch.randn(4, 16), torch.randn(4, 16, dtype=torch.bfloat16)
    w, b = torch.ones(16), torch.zeros(16)
    with torch.autocast("cpu", torch.bfloat16):
        s, y = aln.add_layer_norm(x, delta, w, b, 1e-5)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.layer_norm(x + delta, (16,), w, b).to(torch.bfloat16))


def test_layer_norm_backward_op_passes_opcheck_and_refuses_bad_operands():
    torch.manual_seed(0)
    s, dy, ds = torch.randn(10, 12), torch.randn(10, 12), torch.randn(10, 12)
    mean, rstd = s.mean(-1), torch.rsqrt(s.var(-1, unbiased=False) + 1e-5)
    w = torch.randn(12)
    for ds_next in (ds, None):
        torch.library.opcheck(aln._op, (dy, s, mean, rstd, w, ds_next))
    with pytest.raises(ValueError, match="layer_norm_backward needs contiguous"):
        aln.layer_norm_backward(dy, s, mean, rstd, torch.randn(11))
    with pytest.raises(ValueError, match="layer_norm_backward needs contiguous"):
        aln.layer_norm_backward(dy.t().contiguous().t(), s, mean, rstd, w)


def test_layer_norm_backward_falls_back_with_one_warning_when_its_kernel_fails(monkeypatch):
    """If the Triton kernel fails (e.g. a Triton without an API it uses), the op computes the gradients with
    torch ops, warns once and does not try the kernel again."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no such Triton API")

    monkeypatch.setattr(aln, "_failed", [])
    monkeypatch.setattr(aln, "fused_backward_runs", lambda s: True)
    monkeypatch.setattr(aln, "_launch", failing)
    s, dy = torch.randn(6, 8), torch.randn(6, 8)
    mean, rstd, w = s.mean(-1), torch.rsqrt(s.var(-1, unbiased=False) + 1e-5), torch.randn(8)
    with pytest.warns(UserWarning, match="norm_backend=fused: the layer-norm backward kernel failed"):
        got = aln.layer_norm_backward(dy, s, mean, rstd, w)
    want = aln._reference(dy, s, mean, rstd, w, None)
    torch.testing.assert_close(got, want)
    aln.layer_norm_backward(dy, s, mean, rstd, w)
    assert len(calls) == 1


INTERPRETED = r"""
import torch
from imagegen import add_layer_norm as aln
from imagegen.add_layer_norm import Launch

torch.manual_seed(0)
worst = 0.0
for (M, N), launch, with_next in (((37, 24), Launch(), True), ((130, 200), Launch(block_m=4, per_sm=1), False),
                                  ((67, 64), Launch(block_m=16, warps=4), True)):
    s, dy, ds_next = torch.randn(M, N) * 2 + 1, torch.randn(M, N), torch.randn(M, N)
    mean, rstd = s.mean(-1), torch.rsqrt(s.var(-1, unbiased=False) + 1e-5)
    w = torch.randn(N)
    ds_next = ds_next if with_next else None
    got = aln.layer_norm_backward(dy, s, mean, rstd, w, ds_next, launch=launch)
    want = aln._reference(dy.double(), s.double(), mean.double(), rstd.double(), w.double(),
                          None if ds_next is None else ds_next.double())
    for g, r in zip(got, want):
        worst = max(worst, ((g.double() - r).norm() / r.norm()).item())
print("max rel err", worst)
assert worst < 1e-5, worst
"""


def test_layer_norm_backward_kernels_equal_the_reference_in_the_interpreter():
    """The Triton kernels, run by Triton's CPU interpreter in fp32: ds (with and without the downstream
    gradient), dgamma and dbeta equal the fp64 reference, on widths that are no power of two and row counts that
    split unevenly over programs."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max rel err" in done.stdout


HOPPER_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from imagegen import add_layer_norm as aln

target = GPUTarget("cuda", 90, 32)
sig = {"DY": "*bf16", "S": "*bf16", "DS_NEXT": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32", "W": "*fp32",
       "DS": "*bf16", "PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_program": "i32",
       "HAS_DS_NEXT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
for kernel, signature, constexprs in [
        (aln._layer_norm_backward, sig, dict(HAS_DS_NEXT=True, BLOCK_M=8, BLOCK_N=512)),
        (aln._sum_partials, {"PARTIAL": "*fp32", "OUT": "*fp32", "P": "i32", "N": "i32", "BLOCK_P": "constexpr",
                             "BLOCK_N": "constexpr"}, dict(BLOCK_P=32, BLOCK_N=32))]:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                              options={"num_warps": 8})
    assert "cubin" in compiled.asm
    print(kernel.fn.__name__, "compiled for sm_90")
"""


def test_layer_norm_backward_kernels_compile_for_hopper(tmp_path):
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env={**os.environ, "TRITON_CACHE_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled for sm_90") == 2


@pytest.mark.parametrize("residual_dtype", ["float32", "autocast"])
def test_fused_norm_backend_gives_the_same_loss_and_gradients(residual_dtype):
    """model.norm_backend=fused computes the same model: same loss, same gradient for every parameter (on a
    CPU the op's backward is the torch reference; under bf16 autocast both round the same tensors)."""
    kw = dict(vocab_size=11, height=4, width=5, n_layer=2, n_head=2, n_embd=16, layout=["local", "column"],
              residual_dtype=residual_dtype)
    tokens = torch.randint(0, 11, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = ImageTransformer(ModelConfig(**kw))
    model = ImageTransformer(ModelConfig(**kw, norm_backend="fused"))
    model.load_state_dict(reference.state_dict())
    losses = []
    for m in (reference, model):
        with torch.autocast("cpu", torch.bfloat16, enabled=residual_dtype == "autocast"):
            loss = m.loss(tokens)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    tol = {} if residual_dtype == "float32" else {"atol": 2e-2, "rtol": 2e-2}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **tol)


def test_unknown_norm_backend_is_refused():
    with pytest.raises(ValueError, match="norm_backend must be one of"):
        ModelConfig(vocab_size=4, height=2, width=2, n_layer=1, n_head=1, n_embd=8, norm_backend="apex")


def test_norm_survey_times_the_same_computation_for_inductor():
    """scripts/benchmark.py norm compares our kernels with Inductor's code for the same gradients: its torch
    function (what Inductor compiles) gives the reference's ds, dgamma and dbeta."""
    from imagegen.norm_survey import _inductor_backward

    torch.manual_seed(0)
    s, dy, ds_next = torch.randn(10, 12) * 2 + 1, torch.randn(10, 12), torch.randn(10, 12)
    mean, rstd = s.mean(-1), torch.rsqrt(s.var(-1, unbiased=False) + 1e-5)
    w, b = torch.randn(12), torch.randn(12)
    ds, dw, db = _inductor_backward(dy, s, ds_next, mean, rstd, w, b)
    want_ds, want_sums = aln._reference(dy, s, mean, rstd, w, ds_next)
    torch.testing.assert_close(ds, want_ds)
    torch.testing.assert_close(torch.stack([dw, db]), want_sums)
