"""The model's next-token contract and causality, for every layout, through the whole network."""

import pytest
import torch

from imagegen.model import ImageTransformer, ModelConfig

LAYOUTS = [["dense"], ["local", "column"], ["column", "local", "local", "local"], ["row", "column"],
           ["local|column"], ["strided"], ["fixed"]]


def tiny_model(layout, H=4, W=5, C=1, V=11, backend="auto"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, height=H, width=W, channels=C, n_layer=4, n_head=2, n_embd=16,
                      layout=layout, backend=backend)
    return ImageTransformer(cfg).eval()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("C", [1, 3])
def test_next_token_contract(layout, C):
    """logits[:, i] is unchanged when tokens >= i change."""
    model = tiny_model(layout, C=C)
    N = model.grid.num_tokens
    tokens = torch.randint(0, 11, (2, N))
    logits = model(tokens)
    assert logits.shape == (2, N, 11)
    for i in [0, 1, N // 3, N - 1]:
        changed = tokens.clone()
        changed[:, i:] = torch.randint(0, 11, (2, N - i))
        assert torch.allclose(model(changed)[:, : i + 1], logits[:, : i + 1], atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_no_causality_leak_by_gradient(layout):
    """d logits[:, i] / d (embedding of token j) is zero for every j >= i, and not zero for all j < i."""
    model = tiny_model(layout, C=3)
    N = model.grid.num_tokens
    tokens = torch.randint(0, 11, (1, N))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output  # (1, N-1, d): row j is the embedding of token j

    model.tok_emb.register_forward_hook(keep)
    for i in [1, 7, N // 2, N - 1]:
        model.zero_grad()
        model(tokens)[:, i].sum().backward()
        g = captured["emb"].grad[0].abs().sum(-1)  # (N-1,)
        assert torch.all(g[i:] == 0), f"logits[{i}] depend on a later token"
        assert g[i - 1] > 0  # the previous token is always visible (local/dense, or through the residual mix)


def test_sparse_layout_sees_every_earlier_token_after_two_layers():
    model = tiny_model(["local", "column"], H=5, W=4)
    N = model.grid.num_tokens
    tokens = torch.randint(0, 11, (1, N))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["e"] = output

    model.tok_emb.register_forward_hook(keep)
    model(tokens)[:, N - 1].sum().backward()
    assert torch.all(captured["e"].grad[0].abs().sum(-1) > 0)  # every token 0..N-2 influences the last logit


def test_wrong_grid_is_a_clear_error():
    model = tiny_model(["dense"])
    with pytest.raises(ValueError, match="built for a 4x5x1 grid"):
        model(torch.zeros(1, 30, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(n_layer=0), dict(n_embd=-8), dict(height=0), dict(n_head=3),
                                 dict(layout=["diagonal"]), dict(layout=[]), dict(residual_dtype="bfloat16")])
def test_bad_model_config_fails(bad):
    kw = dict(vocab_size=11, height=4, width=4, n_layer=2, n_head=2, n_embd=16, layout=["dense"]) | bad
    with pytest.raises(ValueError):
        ModelConfig(**kw)


def test_activation_checkpointing_gives_the_same_gradients():
    a, b = tiny_model(["local", "column"]), tiny_model(["local", "column"])
    b.cfg.activation_checkpointing = True
    a.train(), b.train()
    tokens = torch.randint(0, 11, (2, a.grid.num_tokens))
    a.loss(tokens).backward(), b.loss(tokens).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


@pytest.mark.parametrize("residual_dtype,expected", [("float32", torch.float32), ("autocast", torch.bfloat16)])
def test_residual_stream_dtype_under_autocast(residual_dtype, expected):
    """residual_dtype=autocast holds the stream between blocks in the autocast dtype (bf16) and nothing
    else: the loss stays within bf16 rounding of the fp32 stream's, and without autocast they are equal."""
    torch.manual_seed(0)
    reference = tiny_model(["local", "column"])
    model = tiny_model(["local", "column"])
    model.cfg.residual_dtype = residual_dtype
    model.load_state_dict(reference.state_dict())
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    tokens = torch.randint(0, 11, (2, model.grid.num_tokens))
    with torch.autocast("cpu", torch.bfloat16):
        loss, ref_loss = model.loss(tokens), reference.loss(tokens)
    assert seen == [expected] * len(model.blocks)
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    seen.clear()
    assert torch.equal(model.loss(tokens), reference.loss(tokens))  # no autocast: fp32 throughout
    assert seen == [torch.float32] * len(model.blocks)
