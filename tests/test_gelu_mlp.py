"""The MLP with its GELU fused into Triton GEMMs (imagegen.gelu_mlp, model.mlp_backend=triton), on a CPU:
the kernels in Triton's CPU interpreter (fp32) against F.linear + F.gelu, compiled for Hopper, and the
fallback where they do not run. bf16 on the GPU: tests/test_gpu.py."""

import os
import subprocess
import sys

import pytest
import torch

from imagegen.model import ImageTransformer, ModelConfig

INTERPRETED_CHECK = r"""
import torch, torch.nn.functional as F
from imagegen import gelu_mlp as gm

gm.AUTOTUNE = False  # the autotuner times kernels on a GPU; the interpreter runs one launch setting each
torch.manual_seed(0)
worst = 0.0
# rows not a multiple of the tile (37, 300), each tile shape, hidden widths 256 and 512, large |h| (tanh saturating)
for M, C, hidden, launch in ((37, 64, 256, (128, 128, 4, 4)), (300, 128, 512, (64, 128, 4, 4)),
                             (130, 64, 256, (128, 256, 8, 3)), (64, 64, 256, (256, 128, 8, 3))):
    gm.CONFIGS[0] = launch
    x = (torch.randn(M, C) * 3).requires_grad_(True)
    w1 = (torch.randn(hidden, C) / C**0.5).requires_grad_(True)
    w2 = (torch.randn(C, hidden) / hidden**0.5).requires_grad_(True)
    dy = torch.randn(M, C)
    y = gm.gelu_mlp(x, w1, w2)
    y.backward(dy)
    xr, w1r, w2r = (t.detach().clone().requires_grad_(True) for t in (x, w1, w2))
    yr = F.linear(F.gelu(F.linear(xr, w1r), approximate="tanh"), w2r)
    yr.backward(dy)
    for a, b in ((y, yr), (x.grad, xr.grad), (w1.grad, w1r.grad), (w2.grad, w2r.grad)):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
    # the custom ops torch.compile sees (eager calls skip the dispatcher): the same values and gradients
    xc, w1c, w2c = (t.detach().clone().requires_grad_(True) for t in (x, w1, w2))
    yc = gm._forward_op(xc, w1c, w2c)[0]
    yc.backward(dy)
    for a, b in ((yc, yr), (xc.grad, xr.grad), (w1c.grad, w1r.grad), (w2c.grad, w2r.grad)):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
print("max rel err", worst)
assert worst < 1e-5, worst
"""


def test_fused_gelu_mlp_equals_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max rel err" in done.stdout


HOPPER_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from imagegen import gelu_mlp as gm

names = ["A", "B", "OUT", "H", "G", "M", "N", "K", "sam", "sak", "sbk", "sbn", "som", "son"]
signature = {n: "*bf16" if n in ("A", "B", "OUT", "H", "G") else "i32" for n in names}
for backward in (False, True):
    for bm, bn, warps, stages in gm.CONFIGS:
        constexprs = dict(BACKWARD=backward, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=gm.BLOCK_K, GROUP_M=8)
        compiled = triton.compile(ASTSource(fn=gm._gemm_gelu, signature={**signature, **{c: "constexpr" for c in constexprs}},
                                            constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        assert "wgmma" in compiled.asm["ptx"], (backward, bm, bn)  # Hopper's tensor-core GEMM instructions
        print("compiled for sm_90 with wgmma")
"""


def test_fused_gelu_mlp_compiles_for_hopper(tmp_path):
    """Every launch setting of both kernels compiles for sm_90 (no GPU needed) and uses wgmma."""
    pytest.importorskip("triton")
    from imagegen import gelu_mlp

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled for sm_90 with wgmma") == 2 * len(gelu_mlp.CONFIGS)


def test_triton_mlp_backend_falls_back_where_the_kernels_do_not_run():
    """On a CPU model.mlp_backend=triton takes the torch path: the same model gives the same logits."""
    kw = dict(vocab_size=11, height=4, width=5, n_layer=2, n_head=2, n_embd=16, layout=["local", "column"])
    torch.manual_seed(0)
    reference = ImageTransformer(ModelConfig(**kw)).eval()
    model = ImageTransformer(ModelConfig(**kw, mlp_backend="triton")).eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 11, (2, 20))
    assert torch.equal(model(tokens), reference(tokens))


def test_unknown_mlp_backend_is_refused():
    with pytest.raises(ValueError, match="mlp_backend must be one of"):
        ModelConfig(vocab_size=11, height=4, width=5, mlp_backend="cutlass")
