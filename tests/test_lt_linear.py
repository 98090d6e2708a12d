"""imagegen.lt_linear: the cuBLASLt Linear computes F.linear and its gradients; on a CPU its GEMMs are torch.mm's,
eager and compiled (the GPU's cuBLASLt path: test_gpu.py)."""

import torch
import torch.nn.functional as F

from imagegen.lt_linear import lt_linear
from imagegen.model import ImageTransformer, ModelConfig


def test_lt_linear_equals_f_linear_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    g = torch.randn(2, 5, 12)
    for fn in (lt_linear, torch.compile(lt_linear, fullgraph=True)):
        y = fn(x, w)
        (dx, dw) = torch.autograd.grad(y, (x, w), g)
        ref = F.linear(x, w)
        ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), g)
        assert torch.allclose(y, ref, atol=1e-5) and torch.allclose(dx, ref_dx, atol=1e-5)
        assert torch.allclose(dw, ref_dw, atol=1e-5)


def test_model_with_cublaslt_mlp_backend_uses_it_for_projections_and_matches_torch():
    torch.manual_seed(0)
    kw = {"vocab_size": 16, "height": 4, "width": 4, "channels": 3, "n_layer": 2, "n_head": 2, "n_embd": 32,
          "layout": ["local", "column"]}
    reference, model = ImageTransformer(ModelConfig(**kw)), ImageTransformer(ModelConfig(**kw, mlp_backend="fused"))
    model.load_state_dict(reference.state_dict())
    assert model.blocks[0].attn.linear is lt_linear and reference.blocks[0].attn.linear is F.linear
    tokens = torch.randint(0, 16, (2, 48))
    losses = []
    for m in (reference, model):
        loss = m.loss(tokens)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, r.grad, atol=1e-5)


def test_mm_falls_back_to_torch_with_a_warning_when_cublaslt_refuses(monkeypatch):
    import pytest

    from imagegen import cublaslt
    from imagegen import lt_linear as lt

    calls = []

    def refuse(a, b):
        calls.append(1)
        raise cublaslt.CublasLtError("cuBLASLt has no algorithm for this matmul and epilogue")

    monkeypatch.setattr(lt, "_failed", [])
    monkeypatch.setattr(cublaslt, "runs", lambda a, b: True)
    monkeypatch.setattr(cublaslt, "matmul", refuse)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with pytest.warns(UserWarning, match="no algorithm.*torch.mm from here on"):
        assert torch.equal(lt.mm(a, b), torch.mm(a, b))
    assert torch.equal(lt.mm(a, b), torch.mm(a, b)) and len(calls) == 1


def test_lt_linear_with_a_residual_adds_it_and_passes_its_gradient_through():
    torch.manual_seed(0)
    x, w, r = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    g = torch.randn(3, 5)
    for fn in (lt_linear, torch.compile(lt_linear, fullgraph=True)):
        got = fn(x, w, r)
        grads = torch.autograd.grad(got, (x, w, r), g)
        ref = r + F.linear(x, w)
        ref_grads = torch.autograd.grad(ref, (x, w, r), g)
        assert torch.allclose(got, ref, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
