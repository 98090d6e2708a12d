"""model.wgrad=chunked: Linear weight gradients as one batched GEMM over token chunks (imagegen.chunked_wgrad)."""

import pytest
import torch
import torch.nn.functional as F

from imagegen.chunked_wgrad import chunked_weight_grad, chunks, linear
from imagegen.gelu_mlp import gelu_mlp
from imagegen.model import ImageTransformer, ModelConfig


def test_chunk_count_fills_the_gpu_and_divides_the_tokens():
    assert chunks(32768, 512, 512) == 16      # 16 output tiles of 128 x 128: 256 programs
    assert chunks(32768, 2048, 512) == 4      # 64 tiles
    assert chunks(32768, 1536, 512) == 8      # 48 tiles
    assert chunks(16384, 4096, 1024) == 1     # 256 tiles already: one GEMM
    assert chunks(1536, 64, 64) == 2          # chunks of at least 512 tokens
    assert chunks(1000, 64, 64) == 1          # 1000 = 2 x 500: too short
    assert chunks(4097, 64, 64) == 1          # odd: no even split


@pytest.mark.parametrize("tokens", [4096, 24576, 700])
def test_chunked_weight_grad_equals_one_gemm(tokens):
    torch.manual_seed(0)
    dy, x = torch.randn(tokens, 48, dtype=torch.float64), torch.randn(tokens, 40, dtype=torch.float64)
    dw = chunked_weight_grad(dy, x, torch.float64)
    assert dw.shape == (48, 40) and dw.dtype == torch.float64
    torch.testing.assert_close(dw, dy.t() @ x)
    assert chunked_weight_grad(dy.float(), x.float()).dtype == torch.float32  # the fp32 gradient by default


def test_linear_has_f_linear_gradients_for_any_leading_dims():
    torch.manual_seed(0)
    x = torch.randn(4, 1024, 24, dtype=torch.float64, requires_grad=True)  # 4096 tokens: 8 chunks
    w = torch.randn(16, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 1024, 16, dtype=torch.float64)
    linear(x, w).backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.linear(x2, w2).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_linear_under_autocast_computes_in_bf16_and_returns_fp32_gradients():
    """As F.linear under autocast: output in the autocast dtype, gradients in the leaves' dtypes."""
    torch.manual_seed(0)
    x = torch.randn(2048, 32, requires_grad=True)
    w = torch.randn(64, 32, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = linear(x, w)
        ref = F.linear(x, w)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    expected = torch.ones(2048, 64).t() @ x.detach().bfloat16().float()
    assert ((w.grad - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("custom_op", [False, True], ids=["autograd-function", "custom-op"])
def test_gelu_mlp_with_chunked_weight_grads_equals_the_reference(custom_op):
    torch.manual_seed(0)
    x = torch.randn(2, 1024, 16, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(64, 16, dtype=torch.float64) / 4).requires_grad_(True)
    w2 = (torch.randn(16, 64, dtype=torch.float64) / 8).requires_grad_(True)
    dy = torch.randn(2, 1024, 16, dtype=torch.float64)
    gelu_mlp(x, w1, w2, custom_op=custom_op, chunked_wgrad=True).backward(dy)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    F.linear(F.gelu(F.linear(leaves[0], leaves[1]), approximate="tanh"), leaves[2]).backward(dy)
    for got, ref in zip((x, w1, w2), leaves):
        torch.testing.assert_close(got.grad, ref.grad)


def test_model_with_chunked_wgrad_has_the_same_loss_and_gradients():
    kw = dict(vocab_size=11, height=32, width=32, n_layer=2, n_head=2, n_embd=16, layout=["local", "column"])
    torch.manual_seed(0)
    reference = ImageTransformer(ModelConfig(**kw)).double()
    model = ImageTransformer(ModelConfig(**kw, wgrad="chunked")).double()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 11, (2, 1024))  # 2048 tokens a step: weight gradients in 2 to 4 chunks
    loss, ref_loss = model.loss(tokens), reference.loss(tokens)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
