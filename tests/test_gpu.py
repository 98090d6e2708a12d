"""GPU exactness (run on the device tool): every backend equals the fp32 reference in bf16, values and
gradients, relative error < 2e-2. Skipped without CUDA."""

import time

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


@pytest.mark.parametrize("backend,tiles", [("auto", None), ("triton", (64, 64)), ("triton", (64, 128)),
                                           ("triton", (128, 64)), ("flash", None)],
                         ids=["auto", "triton-64x64", "triton-64x128", "triton-128x64", "flash"])
def test_wide_local_window_equals_reference_in_bf16(backend, tiles, monkeypatch):
    """Rows of 64 x 3 tokens (a window of 192 keys, as at N=12288): the band kernel's dq and dk/dv kernels,
    with the tile shapes `scripts/benchmark.py tune` may choose (band_attention.LAUNCH)."""
    from imagegen import band_attention

    if tiles is not None:
        for kernel in ("fwd", "dq", "dkdv"):
            monkeypatch.setitem(band_attention.LAUNCH, kernel, (*tiles, 4, 2))
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


def compiled_variant_matches_reference(option: dict, compile_reference: bool) -> tuple[float, float]:
    """A small sparse model with `option` (a ModelConfig field), compiled as training compiles it, under bf16
    autocast, against the same weights with the defaults (compiled or eager, stock Inductor): loss within 2e-2 and every gradient within 5%
    (relative norm). -> (loss, reference loss)."""
    from imagegen.inductor_sums import installed as column_sums_installed
    from imagegen.model import ImageTransformer, ModelConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=64, height=8, width=16, channels=3, n_layer=4, n_head=2, n_embd=64, layout=["local", "column"])
    reference = ImageTransformer(ModelConfig(**kw)).cuda()
    model = ImageTransformer(ModelConfig(**kw, **option)).cuda()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 64, (4, model.grid.num_tokens), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        ref_loss = (torch.compile(reference.loss) if compile_reference else reference.loss)(tokens)
    ref_loss.backward()
    with column_sums_installed():  # the variant compiles as training compiles it (imagegen.inductor_sums)
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.compile(model.loss)(tokens)
        loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        err = ((p.grad - r.grad).norm() / r.grad.norm()).item()
        assert err < 5e-2, (name, err)
    return loss.item(), ref_loss.item()


def test_compiled_autocast_residual_stream_matches_fp32_stream():
    """model.residual_dtype=autocast (bf16 residual stream), compiled: the loss and the gradients stay within
    bf16 rounding of the fp32 stream's, eager."""
    loss, ref_loss = compiled_variant_matches_reference({"residual_dtype": "autocast"}, compile_reference=False)
    print(f"bf16 residual stream, compiled: loss {loss:.4f} vs {ref_loss:.4f}")


@pytest.mark.parametrize("b_transposed", [False, True], ids=["b-contiguous", "b-transposed"])
@pytest.mark.parametrize("M,K,N", [(4096, 512, 2048), (300, 128, 512)], ids=["4096x512x2048", "300x128x512"])
def test_cublaslt_gelu_epilogue_equals_reference_in_bf16(M, K, N, b_transposed):
    """imagegen.cublaslt: the GELU_AUX epilogue writes a @ b and its tanh-GELU, within bf16 rounding of the
    fp32 reference, as does the GEMM without epilogue; 300 rows is no multiple of a tile."""
    import torch.nn.functional as F

    from imagegen import cublaslt

    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda").bfloat16()
    b = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16().t() if b_transposed else \
        (torch.randn(K, N, device="cuda") / K**0.5).bfloat16()
    g, pre = cublaslt.matmul_gelu(a, b)
    ref_pre = a.float() @ b.float()
    errs = {"plain": cublaslt.matmul(a, b).float(), "pre": pre.float(), "gelu": g.float()}
    refs = {"plain": ref_pre, "pre": ref_pre, "gelu": F.gelu(ref_pre, approximate="tanh")}
    errs = {k: ((errs[k] - refs[k]).norm() / refs[k].norm()).item() for k in errs}
    print(f"cuBLASLt GELU epilogue {M}x{K}x{N} b_transposed={b_transposed}: rel err {errs}")
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("a_transposed,b_transposed", [(True, False), (True, True), (False, False)],
                         ids=["aT-b", "aT-bT", "a-b"])
@pytest.mark.parametrize("M,K,N", [(1536, 32768, 512), (200, 304, 136)], ids=["wgrad-like", "odd"])
def test_cublaslt_matmul_of_transposed_views_equals_reference(M, K, N, a_transposed, b_transposed):
    """imagegen.cublaslt.matmul on a transposed `a` (a wgrad's dy^T) and `b`, with a workspace where its chosen
    algorithm needs one (split-K over 32768 tokens): within bf16 rounding of fp32."""
    from imagegen import cublaslt

    torch.manual_seed(0)
    a = torch.randn(K, M, device="cuda").bfloat16().t() if a_transposed else torch.randn(M, K, device="cuda").bfloat16()
    b = torch.randn(N, K, device="cuda").bfloat16().t() if b_transposed else torch.randn(K, N, device="cuda").bfloat16()
    assert cublaslt.runs(a, b)
    ref = a.float() @ b.float()
    err = ((cublaslt.matmul(a, b).float() - ref).norm() / ref.norm()).item()
    print(f"cuBLASLt matmul {M}x{K}x{N} a_t={a_transposed} b_t={b_transposed}: rel err {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("timing,M", [("graph", 4104), ("eager", 4200), ("sustained", 4304)])
def test_cublaslt_times_every_candidate_and_keeps_the_fastest(timing, M, monkeypatch):
    """Each shape's first call times every heuristic candidate (in a CUDA graph by default, eagerly with
    IMAGEGEN_CUBLASLT_TIMING=eager; =sustained times the four fastest again under load), keeps the fastest, and the call's result is the product; an algorithm that
    keeps a scheduler counter in a few bytes of workspace is timed with it and without it, and the chosen one
    issues a memset exactly when it has that workspace; a first call under someone else's graph capture takes
    the heuristic's first answer."""
    from imagegen import cublaslt
    from imagegen.benchmark import launched_kernels

    monkeypatch.setenv(cublaslt.TIMING_ENV, timing)
    torch.manual_seed(0)
    a, b = torch.randn(M, 512, device="cuda").bfloat16(), torch.randn(512, 1024, device="cuda").bfloat16()
    ref = a.float() @ b.float()
    err = ((cublaslt.matmul(a, b).float() - ref).norm() / ref.norm()).item()
    plan = next(p for p in cublaslt.plans() if (p["M"], p["N"], p["K"]) == (M, 1024, 512))
    times = plan["candidate_ms"]
    print(f"cuBLASLt {timing} timing {M}x512x1024: candidates {times} ms, workspaces {plan['candidate_workspace']}, "
          f"chose {plan['chosen']}; rel err {err:.2e}")
    assert err < 1e-2 and len(times) == len(plan["candidate_workspace"]) and all(t > 0 for t in times)
    if timing == "sustained":  # the fastest few timed again under load, the fastest of those kept
        again = {int(i): t for i, t in plan["sustained_ms"].items()}
        assert sorted(again) == sorted(sorted(range(len(times)), key=times.__getitem__)[:4])
        assert plan["chosen"] == min(again, key=again.__getitem__)
    else:
        assert len(times) == 1 or plan["chosen"] == min(range(len(times)), key=times.__getitem__)

    rows = 6 * M  # about the 12288 x 2 model's token count
    a3, w3 = torch.randn(rows, 512, device="cuda").bfloat16(), torch.randn(1536, 512, device="cuda").bfloat16()
    ref3 = a3.float() @ w3.float().t()  # the q/k/v projection's layout, where nvjet keeps a scheduler counter
    out3 = cublaslt.matmul(a3, w3.t())
    assert ((out3.float() - ref3).norm() / ref3.norm()).item() < 1e-2
    plan3 = next(p for p in cublaslt.plans() if (p["M"], p["N"], p["K"]) == (rows, 1536, 512))
    spaces, chosen = plan3["candidate_workspace"], plan3["chosen"]
    small = sum(1 for ws in spaces if 0 < ws <= cublaslt._SCHEDULER_WORKSPACE)
    kernels = launched_kernels(lambda: cublaslt.matmul(a3, w3.t()))
    print(f"q/k/v layout {rows}x512x1536: workspaces {spaces}, times {plan3['candidate_ms']}, chose {chosen}: "
          f"{kernels}")
    assert spaces.count(0) >= small  # each counter-keeping algorithm is also timed without its workspace
    assert any("Memset" in k for k in kernels) == (0 < spaces[chosen] <= cublaslt._SCHEDULER_WORKSPACE)

    a2 = torch.randn(M + 8, 512, device="cuda").bfloat16()  # a new shape, first called while capturing
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        out = cublaslt.matmul(a2, b)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = a2.float() @ b.float()
    assert ((out.float() - ref2).norm() / ref2.norm()).item() < 1e-2
    plan2 = next(p for p in cublaslt.plans() if (p["M"], p["N"], p["K"]) == (M + 8, 1024, 512))
    assert plan2["chosen"] == 0 and plan2["candidate_ms"] == []


def test_clock_sampler_reads_the_cards_sm_clock_and_power_while_it_works():
    """imagegen.gpu_clock through NVML: samples while GEMMs run, with a plausible SM clock and power draw."""
    from imagegen.gpu_clock import ClockSampler

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with ClockSampler() as clocks:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.5:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
    summary = clocks.summary()
    print(f"clock sampler: {summary}")
    assert summary["samples"] >= 3 and 100 < summary["sm_mhz"] < 4000 and 10 < summary["power_w"] < 2000


def test_profile_reports_the_synchronisations_a_step_makes():
    """scripts/benchmark.py profile lists the ATen calls in a step that wait for the GPU (.item() here), with
    the line that made each, and none for a step without one; the sync debug mode is off again afterwards."""
    from imagegen.train_benchmark import synchronizing_calls

    x = torch.ones(8, device="cuda")
    assert synchronizing_calls(lambda: x * 2) == []
    syncs = synchronizing_calls(lambda: (x * 2).sum().item())
    assert len(syncs) == 1 and "test_gpu.py" in syncs[0], syncs
    assert torch.cuda.get_sync_debug_mode() == 0


@pytest.mark.parametrize("M,K,N", [(4096, 512, 2048), (300, 128, 200)], ids=["4096x512x2048", "300x128x200"])
def test_matmul_dgelu_equals_reference_in_bf16(M, K, N):
    """imagegen.dgelu_matmul, as the model calls it and with each launch setting benchmark.py dgelu times (the
    GPU's tanh.approx among them): (dy @ w) * gelu_tanh'(h) within bf16 rounding of the fp32 reference, and the
    GEMM alone likewise; 300 x 200 is no multiple of a tile."""
    from imagegen import dgelu_matmul

    torch.manual_seed(0)
    dy, w = torch.randn(M, K, device="cuda").bfloat16(), (torch.randn(K, N, device="cuda") / K**0.5).bfloat16()
    h = (torch.randn(M, N, device="cuda") * 2).bfloat16()
    assert dgelu_matmul.matmul_dgelu_runs(dy, w, h)
    product = dy.float() @ w.float()
    ref = torch.ops.aten.gelu_backward(product, h.float(), approximate="tanh")
    for launch in [None, *dgelu_matmul.LAUNCH_CHOICES]:
        err = ((dgelu_matmul.matmul_dgelu(dy, w, h, launch=launch).float() - ref).norm() / ref.norm()).item()
        gemm = dgelu_matmul.matmul_dgelu(dy, w, h, launch=launch, dgelu=False).float()
        gemm_err = ((gemm - product).norm() / product.norm()).item()
        print(f"matmul_dgelu {M}x{K}x{N} {launch or 'LAUNCH'}: rel err {err:.2e}, GEMM alone {gemm_err:.2e}")
        assert err < 1e-2 and gemm_err < 1e-2, (launch, err, gemm_err)
    assert not dgelu_matmul._failed  # LAUNCH's setting ran the kernel, not the fallback


@pytest.mark.parametrize("fused", [False, True], ids=["cublaslt", "fused"])
@pytest.mark.parametrize("tokens,width", [(4096, 64), (300, 128)], ids=["4096x64", "300x128"])
def test_fused_gelu_mlp_equals_reference_in_bf16(tokens, width, fused):
    """imagegen.gelu_mlp under bf16 autocast, eager and compiled (the custom op), against the fp32 MLP:
    output and gradients within bf16 rounding; 300 rows is not a multiple of any tile. fused: the forward's
    first GEMM is imagegen.dgelu_pingpong's on Hopper, the backward's imagegen.dgelu_matmul's; else cuBLASLt's
    GELU epilogue forward."""
    import functools

    import torch.nn.functional as F

    from imagegen import cublaslt, dgelu_pingpong
    from imagegen import gelu_mlp as mlp_module

    gelu_mlp = functools.partial(mlp_module.gelu_mlp, fused=fused)

    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda") * 2
    w1 = torch.randn(4 * width, width, device="cuda") / width**0.5
    w2 = torch.randn(width, 4 * width, device="cuda") / (4 * width) ** 0.5
    dy = torch.randn(tokens, width, device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    ref_y = F.linear(F.gelu(F.linear(leaves[0], leaves[1]), approximate="tanh"), leaves[2])
    ref_y.backward(dy)
    ref = [ref_y.detach(), *(t.grad for t in leaves)]
    mlp_module.forward_kernels.clear()
    for name, fn in (("eager", gelu_mlp), ("compiled", torch.compile(gelu_mlp, fullgraph=True))):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(*leaves)
        assert y.dtype == torch.bfloat16
        y.backward(dy.bfloat16())
        errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([y.detach(), *(t.grad for t in leaves)], ref)]
        print(f"bf16 fused GELU MLP {name:8s} {tokens}x{width} fused={fused} max rel err (y, dx, dW1, dW2) = {max(errs):.2e}")
        assert max(errs) < 2e-2
    hopper = dgelu_pingpong.pingpong_runs(x)
    # the fused GEMM ran, no fallback: the Gluon kernel (fused, Hopper) or cuBLASLt's GELU epilogue
    assert mlp_module.forward_kernels == ({"pingpong"} if fused and hopper else {"cublaslt"})
    if not (fused and hopper):
        assert (tokens, "gelu_aux") in {(p["M"], p["epilogue"]) for p in cublaslt.plans()}


@pytest.mark.parametrize("M,K,N", [(300, 128, 200), (4096, 512, 2048), (24576, 512, 2048)])
def test_pingpong_gelu_forward_equals_reference_in_bf16(M, K, N):
    """imagegen.dgelu_pingpong's forward (Hopper): h = x @ w^T and g = gelu_tanh(h) within bf16 rounding of
    fp32, on sizes that are no multiple of its tiles too; the same h and g as cuBLASLt's GELU_AUX epilogue up
    to rounding."""
    import torch.nn.functional as F

    from imagegen import cublaslt, dgelu_pingpong

    torch.manual_seed(0)
    x, w = torch.randn(M, K, device="cuda").bfloat16(), (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
    if not dgelu_pingpong.pingpong_runs(x):
        pytest.skip("the Gluon kernel needs a Hopper GPU and Triton's Gluon")
    h_ref = x.float() @ w.float().t()
    g_ref = F.gelu(h_ref, approximate="tanh")
    g, h, _ = dgelu_pingpong.matmul_gelu_pingpong(x, w)
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in ((h, h_ref), (g, g_ref))]
    g_lt, h_lt = cublaslt.matmul_gelu(x, w.t())
    vs_cublaslt = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((h, h_lt), (g, g_lt))]
    print(f"pingpong gelu forward {M}x{K}x{N}: rel err (h, g) {errs[0]:.2e} {errs[1]:.2e}, "
          f"against cuBLASLt {vs_cublaslt[0]:.2e} {vs_cublaslt[1]:.2e}")
    assert max(errs) < 1e-2 and max(vs_cublaslt) < 1e-2, (errs, vs_cublaslt)


@pytest.mark.parametrize("backend", ["cublaslt", "fused"])
def test_compiled_model_with_gemm_epilogue_mlp_matches_torch_mlp(backend):
    """model.mlp_backend=cublaslt / fused, compiled, in bf16: loss and every gradient within bf16 rounding of
    the torch MLP's."""
    loss, ref_loss = compiled_variant_matches_reference({"mlp_backend": backend}, compile_reference=True)
    print(f"{backend} MLP, compiled: loss {loss:.4f} vs {ref_loss:.4f}")
    from imagegen import cublaslt, dgelu_matmul, lt_linear

    assert not dgelu_matmul._failed  # fused: the fused GEMM ran, no fallback
    assert not lt_linear._failed and any(p["N"] == 3 * 64 for p in cublaslt.plans())  # the q/k/v projection's


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


@pytest.mark.parametrize("spec", ["local", "column", "row", "strided", "dense"])
@pytest.mark.parametrize("grid", [Grid(16, 16, 3), Grid(8, 64, 3)], ids=str)
def test_packed_projection_equals_reference(spec, grid):
    """What the model runs (attend_packed): a layer takes its one (B, N, 3, h, D) projection, our Triton
    kernels read q, k, v in place and write one packed gradient (local with the one-pass backward at a
    48-key window, the two kernels at 192; column; row up to 128 tokens), other layers use strided slices."""
    from imagegen.attention import attend_packed

    torch.manual_seed(0)
    B, h, D = 2, 4, 64
    base = torch.randn(B, grid.num_tokens, 3, h, D, device="cuda")
    g = torch.randn(B, grid.num_tokens, h, D, device="cuda")
    out = []
    for backend, dtype in (("reference", torch.float32), ("auto", torch.bfloat16)):
        qkv = base.to(dtype).clone().requires_grad_(True)  # a leaf of its own dtype
        y = attend_packed(qkv, LayerSpec.parse(spec), grid, PatternParams(), backend)
        y.backward(g.to(y.dtype))
        out.append([y.detach().float(), qkv.grad.float()])
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(out[1], out[0])]
    print(f"bf16 auto packed {spec:8s} {grid} max rel err (out, dqkv) = {max(errs):.2e}")
    assert max(errs) < 2e-2


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_model_with_packed_attention_matches_reference_backend(compiled):
    """The sparse model on our kernels (packed projection; custom ops when compiled, autograd.Functions when
    eager) against the same weights on the masked reference backend, compiled: loss and every gradient."""
    loss, ref_loss = compiled_variant_matches_reference({"backend": "reference"}, compile_reference=compiled)
    print(f"packed kernels ({'compiled' if compiled else 'eager'}) vs reference backend: loss {ref_loss:.4f} vs {loss:.4f}")


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


def test_compiled_layer_norm_backward_sums_through_column_sums():
    """imagegen.inductor_sums on the real compiler: a compiled layer norm's backward (Inductor's mix-order
    reduction) calls imagegen_column_sums once for its dgamma and dbeta sums, and its gradients equal the stock
    compiled ones and eager fp32's."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.utils import run_and_get_code

    from imagegen.inductor_sums import installed

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(512).cuda()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    # Inductor fuses the two reductions from 5 Mi elements on (smaller ones stay in L2)
    x = torch.randn(16384, 512, device="cuda")
    g = torch.randn(16384, 512, device="cuda")

    def grads(fn):
        norm.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        fn(xr).backward(g)
        return [t.clone() for t in (xr.grad, norm.weight.grad, norm.bias.grad)]

    runs = {}
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for patched in (False, True):
            torch._dynamo.reset()
            with installed(patched):
                runs[patched] = run_and_get_code(grads, torch.compile(norm))
    stock_code, our_code = "\n".join(runs[False][1]), "\n".join(runs[True][1])
    if ".sum(dim=0)" not in stock_code:
        pytest.skip("this torch's Inductor sums no workspace in its wrapper (no mix-order reduction)")
    assert our_code.count("imagegen_column_sums(") >= 1 and ".sum(dim=0)" not in our_code
    ref = grads(norm)
    for name, a, b, c in zip(("dx", "dweight", "dbias"), runs[True][0], runs[False][0], ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name
        assert ((a - c).norm() / c.norm()).item() < 1e-4, name


def test_compiled_grouped_weight_casts_match_autocasts_own():
    """imagegen.weight_cast in the compiled model under bf16 autocast: each block's weights cast by one
    imagegen::cast_group call (forward and backward), and the loss and gradients those of the model whose Linears
    cast their own weights."""
    from torch._inductor.utils import run_and_get_code

    from imagegen import weight_cast
    from imagegen.model import ImageTransformer, ModelConfig

    torch.manual_seed(0)
    weights = [torch.randn(1536, 512, device="cuda") * 100, torch.randn(512, 2048, device="cuda"),
               torch.randn(7, device="cuda"), torch.randn(3, 5, device="cuda").t()]  # the last one transposed
    low = weight_cast.cast_group(weights, torch.bfloat16)
    assert all(torch.equal(a, w.to(torch.bfloat16)) for a, w in zip(low, weights))  # rounded as torch rounds
    cfg = ModelConfig(vocab_size=64, height=8, width=16, channels=3, n_layer=4, n_head=2, n_embd=64,
                      layout=["local", "column"], residual_dtype="autocast", mlp_backend="fused")
    model = ImageTransformer(cfg).cuda()
    tokens = torch.randint(0, 64, (4, model.grid.num_tokens), device="cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.compile(model.loss)(tokens)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    runs = {}
    for grouped in (False, True):
        torch._dynamo.reset()
        for block in model.blocks:
            block.group_casts = grouped
        runs[grouped] = run_and_get_code(loss_and_grads)
    (loss, grads), code = runs[True]
    (ref_loss, ref_grads), ref_code = runs[False]
    assert "cast_group" in "\n".join(code) and "cast_group" not in "\n".join(ref_code)
    assert abs(loss - ref_loss) < 1e-3
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert ((g - r).norm() / r.norm()).item() < 1e-2, name
    print(f"grouped casts, compiled: loss {loss:.5f} vs {ref_loss:.5f}")


def test_compiled_residual_added_in_the_projections_gemms_matches_reference():
    """model.residual_dtype=autocast with the fused MLP, compiled: the attention's and the MLP's last GEMMs add the
    bf16 residual stream in their epilogues (cuBLASLt, beta = 1), and the loss and gradients stay within bf16
    rounding of the fp32 stream's with the torch MLP, eager."""
    from imagegen import cublaslt

    loss, ref_loss = compiled_variant_matches_reference({"residual_dtype": "autocast", "mlp_backend": "fused"},
                                                        compile_reference=False)
    print(f"residual added in the GEMMs, compiled: loss {loss:.4f} vs {ref_loss:.4f}")
    adds = {(p["N"], p["K"]) for p in cublaslt.plans() if p["adds_c"]}
    assert {(64, 64), (64, 256)} <= adds  # the attention's output projection, the MLP's proj (n_embd 64)
