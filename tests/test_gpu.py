"""GPU exactness (run on the device tool): every backend equals the fp32 reference in bf16, values and
gradients, relative error < 2e-2. Skipped without CUDA."""

import pytest
import torch

from imagegen.attention import BACKENDS, Grid, attend, supports
from imagegen.patterns import LayerSpec, PatternParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRIDS = [Grid(64, 64, 1), Grid(9, 11, 3)]  # 4096 tokens; 297 tokens (C = 3, not a multiple of 128)
SPECS = ["dense", "local", "column", "row", "strided", "fixed", "local|column", "row|column", "column|local+column"]
# Every forced backend on every pattern it runs; `auto` where it mixes backends within a layer (per-head
# layouts) or is the only fast path (dense); single-pattern `auto` is one of the forced cases.
CASES = [(s, b) for s in SPECS for b in BACKENDS if b != "reference"
         and all(supports(b, g) for g in LayerSpec.parse(s).groups)
         and (b != "auto" or "|" in s or s == "dense")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles FlexAttention for its own shape; start each from a clean compile cache so that
    the flex backend's recompile-limit guard only fires for a real model."""
    torch._dynamo.reset()
    yield


def run(spec, grid, backend, q, k, v, g, params):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = attend(q, k, v, LayerSpec.parse(spec), grid, params, backend)
    y.backward(g.to(y.dtype))
    return [t.float() for t in (y.detach(), q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("spec,backend", CASES)
def test_backend_equals_reference_in_bf16(grid, spec, backend):
    torch.manual_seed(0)
    B, h, D = 2, 4, 64
    params = PatternParams(rows=1)
    q, k, v, g = (torch.randn(B, grid.num_tokens, h, D, device="cuda") for _ in range(4))
    ref = run(spec, grid, "reference", q, k, v, g, params)  # fp32 ground truth
    fast = run(spec, grid, backend, *(t.bfloat16() for t in (q, k, v)), g, params)
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(fast, ref)]
    print(f"bf16 {backend:9s} {spec:22s} {str(grid):8s} max rel err (out, dq, dk, dv) = {max(errs):.2e}")
    assert max(errs) < 2e-2


@pytest.mark.parametrize("backend", ["auto", "triton", "flash"])
def test_wide_local_window_equals_reference_in_bf16(backend):
    """Rows of 64 x 3 tokens (a window of 192 keys, as at N=12288): half of the tiles a query visits in the
    band kernel lie wholly inside the band and skip the mask."""
    torch.manual_seed(0)
    grid, params = Grid(8, 64, 3), PatternParams(rows=1)
    q, k, v, g = (torch.randn(2, grid.num_tokens, 4, 64, device="cuda") for _ in range(4))
    ref = run("local", grid, "reference", q, k, v, g, params)
    fast = run("local", grid, backend, *(t.bfloat16() for t in (q, k, v)), g, params)
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(fast, ref)]
    print(f"bf16 {backend:9s} local, window 192       max rel err (out, dq, dk, dv) = {max(errs):.2e}")
    assert max(errs) < 2e-2


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_compiled_flash_local_equals_reference_in_bf16(grid):
    """Under torch.compile the flash `local` backend runs as custom ops (eagerly, as an autograd.Function:
    the case above); values and gradients both ways."""
    torch.manual_seed(0)
    params, spec = PatternParams(rows=1), LayerSpec.parse("local")
    q, k, v, g = (torch.randn(2, grid.num_tokens, 4, 64, device="cuda") for _ in range(4))
    ref = run("local", grid, "reference", q, k, v, g, params)
    compiled = torch.compile(lambda a, b, c: attend(a, b, c, spec, grid, params, "flash"), fullgraph=True)
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    y = compiled(qb, kb, vb)
    y.backward(g.bfloat16())
    fast = [t.float() for t in (y.detach(), qb.grad, kb.grad, vb.grad)]
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(fast, ref)]
    print(f"bf16 compiled flash local {grid!s:8s} max rel err (out, dq, dk, dv) = {max(errs):.2e}")
    assert max(errs) < 2e-2


@pytest.mark.parametrize("width,channels,backend", [(16, 1, "auto"), (64, 3, "auto"), (64, 3, "triton")],
                         ids=["window16", "window192", "window192-triton"])
def test_compiled_model_trains_in_bf16(width, channels, backend):
    """torch.compile of the whole model (our kernels as custom ops) matches eager, and trains."""
    from imagegen.model import ImageTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=64, height=4, width=width, channels=channels, n_layer=2, n_head=2, n_embd=64,
                      layout=["local", "column"], backend=backend)
    model = ImageTransformer(cfg).cuda()
    compiled = torch.compile(model)
    tokens = torch.randint(0, 64, (4, model.grid.num_tokens), device="cuda")
    ce = lambda logits: torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())  # noqa: E731
    with torch.autocast("cuda", torch.bfloat16):
        eager, fast = ce(model(tokens)), ce(compiled(tokens))
    assert abs(eager.item() - fast.item()) < 2e-2
    fast.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compiled_autocast_residual_stream_matches_fp32_stream():
    """model.residual_dtype=autocast (bf16 residual stream), compiled: the loss and the gradients stay within
    bf16 rounding of the fp32 stream's, eager."""
    from imagegen.model import ImageTransformer, ModelConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=64, height=8, width=16, channels=3, n_layer=4, n_head=2, n_embd=64, layout=["local", "column"])
    reference = ImageTransformer(ModelConfig(**kw)).cuda()
    model = ImageTransformer(ModelConfig(**kw, residual_dtype="autocast")).cuda()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 64, (4, model.grid.num_tokens), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        ref_loss, loss = reference.loss(tokens), torch.compile(model.loss)(tokens)
    ref_loss.backward(), loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        err = ((p.grad - r.grad).norm() / r.grad.norm()).item()
        assert err < 5e-2, (name, err)
    print(f"bf16 residual stream, compiled: loss {loss.item():.4f} vs {ref_loss.item():.4f}")


@pytest.mark.parametrize("layout", [["dense"], ["local", "column"], ["local|column"], ["strided"]], ids=str)
def test_cuda_graph_decoding_equals_full_forward(layout):
    """The captured decode step (static caches, device-side position, one graph per key span) gives the
    logits of one full forward pass, fp32 on the GPU."""
    from imagegen.model import ImageTransformer, ModelConfig
    from imagegen.sampling import Sampler

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, height=12, width=12, channels=3, n_layer=4, n_head=4, n_embd=64, layout=layout)
    model = ImageTransformer(cfg).cuda().eval()
    tokens = torch.randint(0, 32, (3, model.grid.num_tokens), device="cuda")
    sampler = Sampler(model, 3, span=128)
    assert sampler.use_graphs
    cached = sampler.teacher_forced_logits(tokens)
    full = model(tokens)
    assert torch.allclose(cached, full, atol=1e-4, rtol=1e-3), (cached - full).abs().max()
    greedy = sampler.generate(top_k=1, seed=0)
    eager = Sampler(model, 3, cuda_graphs=False, span=128).generate(top_k=1, seed=0)
    assert torch.equal(greedy, eager)


@pytest.mark.parametrize("spec", ["local", "strided", "dense"])
def test_strided_qkv_views_equal_reference(spec):
    """Layers without row/column take q, k, v as strided slices of one (B, N, 3, h, D) projection."""
    torch.manual_seed(0)
    grid, B, h, D = Grid(16, 16, 3), 2, 4, 64
    base = torch.randn(B, grid.num_tokens, 3, h, D, device="cuda")
    g = torch.randn(B, grid.num_tokens, h, D, device="cuda")
    out = []
    for backend, dtype in (("reference", torch.float32), ("auto", torch.bfloat16)):
        qkv = base.to(dtype).clone().requires_grad_(True)  # a leaf of its own dtype
        q, k, v = qkv.unbind(2)  # (B, N, h, D) each, strided
        y = attend(q, k, v, LayerSpec.parse(spec), grid, PatternParams(), backend)
        y.backward(g.to(y.dtype))
        out.append([y.detach().float(), qkv.grad.float()])
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(out[1], out[0])]
    print(f"bf16 auto strided-views {spec:10s} max rel err (out, dqkv) = {max(errs):.2e}")
    assert max(errs) < 2e-2


def test_bf16_cuda_graph_sampling_equals_eager_bf16():
    """What sample.py runs on a GPU: a bf16 model, captured steps; the logits of the eager steps."""
    from imagegen.model import ImageTransformer, ModelConfig
    from imagegen.sampling import Sampler

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, height=16, width=16, n_layer=4, n_head=4, n_embd=128, layout=["local", "column"])
    model = ImageTransformer(cfg).cuda().bfloat16().eval()
    tokens = torch.randint(0, 64, (8, 256), device="cuda")
    graphs = Sampler(model, 8).teacher_forced_logits(tokens).float()
    eager = Sampler(model, 8, cuda_graphs=False).teacher_forced_logits(tokens).float()
    assert ((graphs - eager).norm() / eager.norm()).item() < 1e-2
    sampled = Sampler(model, 8).generate(top_k=8, seed=3)
    assert sampled.shape == (8, 256) and 0 <= sampled.min() and sampled.max() < 64
