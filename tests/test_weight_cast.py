"""imagegen.weight_cast: a block's Linear weights cast together under autocast give the same numbers as autocast's
own casts, eager and compiled (CPU autocast, bf16)."""

import pytest
import torch
from conftest import COMPILE_FOR_HOPPER, run_python

from imagegen import weight_cast
from imagegen.model import ImageTransformer, ModelConfig


def test_cast_group_casts_and_its_gradient_comes_back_in_the_weights_dtype():
    torch.manual_seed(0)
    weights = [torch.randn(6, 4, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
    low = weight_cast.cast_group(weights, torch.bfloat16)
    assert [w.dtype for w in low] == [torch.bfloat16] * 2
    assert all(torch.equal(a, w.to(torch.bfloat16)) for a, w in zip(low, weights))
    # one gradient contiguous, one transposed (as a GEMM may write it): both widened exactly
    grads = [torch.randn(6, 4).to(torch.bfloat16), torch.randn(5, 3).to(torch.bfloat16).t()]
    torch.autograd.backward(low, grads)
    for w, g in zip(weights, grads):
        assert w.grad.dtype == torch.float32 and w.grad.is_contiguous() and torch.equal(w.grad, g.float())


def test_cast_group_refuses_mixed_dtypes():
    try:
        weight_cast.cast_group([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], torch.bfloat16)
    except ValueError as e:
        assert "one dtype" in str(e)
    else:
        raise AssertionError("mixed dtypes were accepted")


def _loss_and_grads(model, tokens, group_casts: bool):
    for block in model.blocks:
        block.group_casts = group_casts
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16):
        loss = model.loss(tokens)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_model_under_autocast_computes_the_same_with_grouped_casts():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, height=4, width=4, channels=3, n_layer=2, n_head=2, n_embd=32,
                      layout=["local", "column"])
    model = ImageTransformer(cfg)
    tokens = torch.randint(0, 16, (2, cfg.grid.num_tokens))
    loss, grads = _loss_and_grads(model, tokens, False)
    grouped_loss, grouped_grads = _loss_and_grads(model, tokens, True)
    assert torch.equal(loss, grouped_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grouped_grads))
    assert weight_cast.autocast_dtype(torch.zeros(1), model.head.weight) is None  # autocast off: nothing cast


# (Triton's interpreter truncates on a downcast: values already bf16 check the indexing; the rounding is checked in
# the kernel compiled for sm_90 below, and on the GPU)
INTERPRETED = r"""
import torch
from imagegen import weight_cast
torch.manual_seed(0)
for sizes in ([(6, 4), (3, 5), (2049,), (1,)], [(4096,)], [(7, 3)] * 6):  # four, one, more than four tensors
    src = [(torch.randn(s) * 1000).to(torch.bfloat16).float() for s in sizes]
    dst = [torch.empty(s, dtype=torch.bfloat16) for s in sizes]
    back = [torch.empty(s) for s in sizes]
    for first in range(0, len(src), 4):
        part = slice(first, first + 4)
        pad = 4 - len(src[part])
        n = [t.numel() for t in src[part]] + [0] * pad
        grid = (sum(-(-k // 64) for k in n),)
        for a, b in ((src, dst), (dst, back)):  # fp32 -> bf16 -> fp32
            weight_cast._cast_four[grid](*a[part], *a[part][:1] * pad, *b[part], *b[part][:1] * pad, *n, BLOCK=64)
    assert all(torch.equal(d, s.to(torch.bfloat16)) and torch.equal(b, s) for d, b, s in zip(dst, back, src)), sizes
print("interpreted ok")
"""


def test_cast_kernel_copies_every_tensor_in_the_interpreter(triton_interpreter):
    assert "interpreted ok" in run_python(INTERPRETED, TRITON_INTERPRET="1")


HOPPER_COMPILE = r"""
from imagegen import weight_cast as w
signature = {**{f"SRC{k}": "*fp32" for k in range(4)}, **{f"DST{k}": "*bf16" for k in range(4)},
             **{f"N{k}": "i32" for k in range(4)}, "BLOCK": "constexpr"}
compiled = compile_for_hopper(w._cast_four, signature, {"BLOCK": w.BLOCK}, num_warps=w.WARPS)
ptx = compiled.asm["ptx"]
assert "cvt.rn.bf16" in ptx and "cvt.rz" not in ptx  # rounded to nearest even, as torch's .to(torch.bfloat16)
print("compiled for sm_90")
"""


def test_cast_kernel_compiles_for_hopper_rounding_to_nearest_even(tmp_path):
    pytest.importorskip("triton")
    assert "compiled for sm_90" in run_python(COMPILE_FOR_HOPPER + HOPPER_COMPILE, TRITON_CACHE_DIR=str(tmp_path))
