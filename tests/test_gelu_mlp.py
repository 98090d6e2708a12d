"""The MLP with its GELU in GEMM epilogues (imagegen.gelu_mlp, model.mlp_backend=cublaslt and fused), on a CPU: its
op and the registered backward against F.linear + F.gelu (off CUDA the op computes with torch.mm and F.gelu), what
cuBLASLt and the fused backward GEMM (imagegen.dgelu_matmul, in Triton's interpreter) accept and compute, and the
fallbacks. The GEMMs in bf16: tests/test_gpu.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python, triton_version

from imagegen import cublaslt
from imagegen.gelu_mlp import gelu_mlp, gelu_mlp_runs
from imagegen.model import ImageTransformer, ModelConfig


@pytest.mark.parametrize("fused", [False, True], ids=["cublaslt", "fused"])
@pytest.mark.parametrize("custom_op", [False, True], ids=["autograd-function", "custom-op"])
def test_gelu_mlp_output_and_gradients_equal_the_reference(custom_op, fused):
    """Both entry points (the eager autograd.Function and the custom op torch.compile sees) give
    proj(gelu_tanh(fc(x))) and its gradients for x, fc_weight and proj_weight; leading dims are kept."""
    torch.manual_seed(0)
    x = (torch.randn(2, 37, 16, dtype=torch.float64) * 3).requires_grad_(True)  # large |h|: tanh saturates
    w1 = (torch.randn(64, 16, dtype=torch.float64) / 4).requires_grad_(True)
    w2 = (torch.randn(16, 64, dtype=torch.float64) / 8).requires_grad_(True)
    dy = torch.randn(2, 37, 16, dtype=torch.float64)
    y = gelu_mlp(x, w1, w2, custom_op=custom_op, fused=fused)  # off CUDA: the unfused kernels
    y.backward(dy)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    ref = F.linear(F.gelu(F.linear(leaves[0], leaves[1]), approximate="tanh"), leaves[2])
    ref.backward(dy)
    assert y.shape == (2, 37, 16)
    torch.testing.assert_close(y, ref)
    for got, want in zip((x.grad, w1.grad, w2.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got, want)


def test_gelu_mlp_casts_to_the_autocast_dtype():
    x, w1, w2 = torch.randn(8, 16), torch.randn(64, 16), torch.randn(16, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = gelu_mlp(x, w1, w2)
    assert y.dtype == torch.bfloat16


def test_cublaslt_takes_only_cuda_half_precision_operands_in_its_layouts():
    a, w = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(64, 16, dtype=torch.bfloat16)
    assert not cublaslt.runs(a, w.t())  # a CPU tensor
    assert not gelu_mlp_runs(a, 64)
    with pytest.raises(ValueError, match="cuBLASLt matmul needs CUDA bf16/fp16"):
        cublaslt.matmul_gelu(a, w.t())


@pytest.mark.parametrize("backend", ["cublaslt", "fused"])
def test_gemm_epilogue_mlp_backends_fall_back_where_the_fused_gemms_do_not_run(backend):
    """On a CPU model.mlp_backend=cublaslt and fused take the torch path: the same model gives the same logits."""
    kw = dict(vocab_size=11, height=4, width=5, n_layer=2, n_head=2, n_embd=16, layout=["local", "column"])
    torch.manual_seed(0)
    reference = ImageTransformer(ModelConfig(**kw)).eval()
    model = ImageTransformer(ModelConfig(**kw, mlp_backend=backend)).eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 11, (2, 20))
    assert torch.equal(model(tokens), reference(tokens))


def test_matmul_dgelu_refuses_operands_it_cannot_take():
    """The fused backward GEMM says what it needs instead of launching on operands TMA cannot describe."""
    from imagegen.dgelu_matmul import matmul_dgelu, matmul_dgelu_runs

    dy, w, h = torch.randn(8, 64), torch.randn(64, 20), torch.randn(8, 20)  # 20 columns: rows not 16-byte aligned
    assert not matmul_dgelu_runs(dy, w, h)  # (a CPU tensor, too)
    with pytest.raises(ValueError, match="K a multiple of 64 and N of 8"):
        matmul_dgelu(dy, w, h)


def test_matmul_dgelu_falls_back_kernel_by_kernel_with_a_warning_each(monkeypatch):
    """If the Gluon kernel fails (e.g. a Triton whose Gluon API differs), the model's calls take the Triton
    kernel, with a warning; if that fails too, torch.mm and gelu_backward give the same result, with another;
    a kernel that failed is not tried again."""
    from imagegen import dgelu_matmul

    tried = []

    def fail(dy, w, h, launch=None, dgelu=True):
        tried.append(launch)
        raise RuntimeError("CompilationError: this Triton has no tensor descriptors")

    monkeypatch.setattr(dgelu_matmul, "_launch", fail)
    monkeypatch.setattr(dgelu_matmul, "_failed", [])
    dy, w, h = torch.randn(8, 64), torch.randn(64, 24), torch.randn(8, 24)
    with pytest.warns(UserWarning) as warned:
        got = dgelu_matmul.matmul_dgelu(dy, w, h)
    messages = [str(m.message) for m in warned]
    assert len(messages) == 2 and all("no tensor descriptors" in m for m in messages), messages
    assert "pingpong=True" in messages[0] and "trying imagegen.dgelu_matmul's Triton kernel" in messages[0]
    assert "torch.mm and gelu_backward instead" in messages[1]
    torch.testing.assert_close(got, torch.ops.aten.gelu_backward(dy @ w, h, approximate="tanh"))
    torch.testing.assert_close(dgelu_matmul.matmul_dgelu(dy, w, h, custom_op=True), got)  # the op, compiled
    assert tried == [dgelu_matmul.LAUNCH["matmul"], dgelu_matmul.LAUNCH["fallback"]]


def test_fused_forward_falls_back_to_the_other_gemms_with_one_warning(monkeypatch):
    """If the forward's Gluon kernel fails, the fused MLP warns once and computes the same output by the other
    path (cuBLASLt's epilogue on a GPU; torch.mm and F.gelu here), and does not try the kernel again;
    IMAGEGEN_FORWARD_PINGPONG=0 turns it off without a warning."""
    from imagegen import dgelu_pingpong
    from imagegen import gelu_mlp as mlp_module

    tried = []

    def fail(x, w, programs=0):
        tried.append(x.shape)
        raise RuntimeError("CompilationError: this Triton's Gluon has no warp_specialize")

    monkeypatch.setattr(mlp_module, "_pingpong_failed", [])
    monkeypatch.setattr(dgelu_pingpong, "pingpong_runs", lambda x: True)  # as on a Hopper GPU
    monkeypatch.setattr(dgelu_pingpong, "matmul_gelu_pingpong", fail)
    x, w1, w2 = (t.bfloat16() for t in (torch.randn(8, 64), torch.randn(256, 64) / 8, torch.randn(64, 256) / 16))
    reference = F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2)  # (the kernel takes 16-bit operands)
    with pytest.warns(UserWarning, match="forward's Gluon GEMM failed .*no warp_specialize.*cuBLASLt"):
        got = mlp_module.gelu_mlp(x, w1, w2, fused=True)
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(mlp_module.gelu_mlp(x, w1, w2, fused=True), reference)  # not tried again
    assert tried == [(8, 64)]
    monkeypatch.setattr(mlp_module, "_pingpong_failed", [])
    monkeypatch.setenv(mlp_module.FORWARD_PINGPONG_ENV, "0")
    torch.testing.assert_close(mlp_module.gelu_mlp(x, w1, w2, fused=True), reference)
    assert tried == [(8, 64)]


def test_unknown_mlp_backend_is_refused():
    with pytest.raises(ValueError, match="mlp_backend must be one of"):
        ModelConfig(vocab_size=11, height=4, width=5, mlp_backend="cutlass")


def test_gelu_mlp_falls_back_with_a_warning_when_cublaslt_refuses(monkeypatch):
    """If cuBLASLt refuses a call (no algorithm, a status error), the op computes the same thing with torch.mm
    and F.gelu, warns once, and does not try cuBLASLt again."""
    from imagegen import gelu_mlp as gm

    calls = []

    def refuse(a, b):
        calls.append(1)
        raise cublaslt.CublasLtError("cuBLASLt has no algorithm for this matmul and epilogue")

    monkeypatch.setattr(gm, "_cublaslt_failed", [])
    monkeypatch.setenv("IMAGEGEN_CUBLASLT_GEMMS", "0")  # (the plain GEMMs: imagegen.lt_linear)
    monkeypatch.setattr(cublaslt, "runs", lambda a, b: True)
    monkeypatch.setattr(cublaslt, "matmul_gelu", refuse)
    x, w1, w2 = torch.randn(8, 16), torch.randn(64, 16), torch.randn(16, 64)
    with pytest.warns(UserWarning, match="no algorithm.*torch.mm and F.gelu instead"):
        y = gelu_mlp(x, w1, w2)
    torch.testing.assert_close(y, F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2))
    gelu_mlp(x, w1, w2)
    assert len(calls) == 1


DGELU_INTERPRETED = r"""
import torch
from imagegen import dgelu_matmul
from imagegen.dgelu_matmul import Launch

torch.manual_seed(0)
worst = 0.0
# (rows of N a multiple of 16 elements: Triton 3.5's interpreter wants that of a tensor descriptor's strides)
for (M, K, N), launch in (((70, 64, 48), Launch(64, 32, 64, 8, 4, 2)),             # one program per tile
                          ((130, 128, 304), Launch(64, 64, halves=2, per_sm=1)),  # persistent, halves
                          ((130, 64, 208), Launch(32, 64, prefetch_h=True))):     # h read before the K loop
    dy, w, h = torch.randn(M, K), torch.randn(K, N) / 8, torch.randn(M, N) * 3  # large |h|: tanh saturates
    product = dy @ w
    ref = torch.ops.aten.gelu_backward(product, h, approximate="tanh")
    worst = max(worst, ((dgelu_matmul._launch(dy, w, h, launch) - ref).norm() / ref.norm()).item(),
                ((dgelu_matmul._launch(dy, w, h, launch, dgelu=False) - product).norm() / product.norm()).item())
dy, w, h = torch.randn(40, 64), torch.randn(64, 32) / 8, torch.randn(40, 32)
torch.library.opcheck(dgelu_matmul._op, (dy, w, h))  # the custom op's schema, fake and dispatch
print("max rel err", worst)
assert worst < 1e-5, worst
"""


def test_matmul_dgelu_kernel_equals_gelu_backward_in_the_interpreter(triton_interpreter):
    """imagegen.dgelu_matmul's Triton kernel, run by Triton's CPU interpreter in fp32: (dy @ w) * gelu_tanh'(h)
    equals aten's gelu_backward of the GEMM, on sizes that are no multiple of its tiles. In bf16: test_gpu.py."""
    pytest.importorskip("triton.tools.tensor_descriptor")  # (Triton >= 3.4; before, the model uses cuBLAS's path)
    assert "max rel err" in run_python(DGELU_INTERPRETED, TRITON_INTERPRET="1")


PINGPONG_COMPILE = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type
from imagegen import dgelu_pingpong as pp

a, h = torch.empty(4096, 512, dtype=torch.bfloat16), torch.empty(4096, 2048, dtype=torch.bfloat16)
w_kn, w_nk = torch.empty(512, 2048, dtype=torch.bfloat16), torch.empty(2048, 512, dtype=torch.bfloat16)
for epilogue, b_nk in [("dgelu", False), ("gelu", True)]:  # the MLP backward's and forward's
    blocks = {"a_desc": (a, [pp.BLOCK_M, pp.BLOCK_K]),
              "b_desc": (w_nk, [pp.BLOCK_N, pp.BLOCK_K]) if b_nk else (w_kn, [pp.BLOCK_K, pp.BLOCK_N]),
              "h_desc": (h, [pp.BLOCK_M, pp.BLOCK_N]), "out_desc": (h, [pp.BLOCK_M, pp.BLOCK_N])}
    signature = {name: mangle_type(TensorDescriptor.from_tensor(t, b, gl.NVMMASharedLayout.get_default_for(b, gl.bfloat16)))
                 for name, (t, b) in blocks.items()}
    constexprs = {"NUM_STAGES": pp.STAGES, "GM": pp.GROUP_M, "EPILOGUE": epilogue, "B_NK": b_nk,
                  "CONSUMER_REGS": pp.CONSUMER_REGISTERS, "LOADER_REGS": pp.LOADER_REGISTERS}
    signature.update(M="i32", N="i32", K="i32", **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(GluonASTSource(fn=pp._matmul_pingpong, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": pp.MAX_REGISTERS})
    assert "cubin" in compiled.asm
    ptx = compiled.asm["ptx"]
    print(epilogue, "shared", compiled.metadata.shared, "wgmma", ptx.count("wgmma.mma_async"),
          "setmaxnreg", ptx.count("setmaxnreg"), "tanh", ptx.count("tanh.approx.f32"),
          "stores", ptx.count("cp.async.bulk.tensor.2d.global.shared"))
"""


def test_pingpong_kernel_compiles_for_hopper(tmp_path):
    """imagegen.dgelu_pingpong's Gluon kernel compiles to sm_90 cubins without a GPU (so a Triton whose Gluon
    API moved fails here, not on the GPU), for the MLP backward (gelu') and forward (h and gelu(h), B transposed
    in shared memory), with its warp-specialized partitions and within the 227 KiB of shared memory an
    H100/H200 program may have; the forward's epilogue has its tanh and two TMA stores. Results: test_gpu.py."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    import triton

    if triton_version(triton) < (3, 6):
        pytest.skip(f"Triton {triton.__version__}'s Gluon API is not the one this kernel is written for (3.6); "
                    "the kernel fails there and the model falls back with a warning (test_*_falls_back_*)")
    import re

    out = run_python(PINGPONG_COMPILE, TRITON_CACHE_DIR=str(tmp_path))
    found = re.findall(r"(\w+) shared (\d+) wgmma (\d+) setmaxnreg (\d+) tanh (\d+) stores (\d+)", out)
    assert [f[0] for f in found] == ["dgelu", "gelu"], out
    for _, shared, wgmma, setmaxnreg, _, _ in found:
        assert int(shared) <= 227 * 1024 and int(wgmma) > 0 and int(setmaxnreg) > 0, out
    (_, *_, dgelu_stores), (_, *_, tanh, gelu_stores) = found
    assert int(tanh) > 0 and int(gelu_stores) > int(dgelu_stores), out
