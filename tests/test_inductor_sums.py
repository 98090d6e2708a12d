"""imagegen.inductor_sums: Inductor's final workspace sums rewritten to one Triton kernel each. On a CPU: the
rewrite of the wrapper lines, its install and removal, the kernel in Triton's interpreter and compiled for sm_90.
The compiled layer norm on a GPU: test_gpu.py."""

import types

import pytest
from conftest import run_python

from imagegen import inductor_sums

# the line as torch 2.11 writes it, and as later versions do (parenthesised sizes, a view and a cast after)
LINES = {
    "buf8 = workspace_0[0 * 2048 * 512 : (0 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)":
        "buf8 = imagegen_column_sum(workspace_0[0 * 2048 * 512 : (0 + 1) * 2048 * 512].view(2048, 512))",
    "buf10 = workspace_1[1 * (1536) * (512) : (1 + 1) * (1536) * (512)].view(1536, 512).sum(dim=0).view([512])"
    ".to(torch.bfloat16)":
        "buf10 = imagegen_column_sum(workspace_1[1 * (1536) * (512) : (1 + 1) * (1536) * (512)].view(1536, 512))"
        ".view([512]).to(torch.bfloat16)",
}
UNTOUCHED = ["buf3 = workspace_0[0 * 64 * 8 : (0 + 1) * 64 * 8].view(64, 8).amax(dim=0)",  # another reduction
             "buf5 = buf4.sum(dim=0)", "del workspace_0"]


def test_rewrite_turns_only_final_workspace_sums_into_column_sum_calls():
    for line, expected in LINES.items():
        assert inductor_sums.rewrite(line) == expected
    for line in UNTOUCHED:
        assert inductor_sums.rewrite(line) is None


def test_installed_rewrites_wrapper_lines_and_restores_the_wrapper(monkeypatch):
    pytest.importorskip("torch._inductor.codegen.wrapper")
    cls = inductor_sums._wrapper_class()
    original = cls.writeline
    line = next(iter(LINES))
    wrapper = types.SimpleNamespace(lines=[])  # what PythonWrapperCodegen.writeline appends to
    with inductor_sums.installed():
        cls.writeline(wrapper, line)
        cls.writeline(wrapper, UNTOUCHED[1])
    assert cls.writeline is original
    assert wrapper.lines == [inductor_sums._IMPORT, LINES[line], UNTOUCHED[1]]
    wrapper.lines.clear()
    with inductor_sums.installed(active=False):
        cls.writeline(wrapper, line)
    monkeypatch.setenv(inductor_sums.ENV, "0")
    with inductor_sums.installed():
        cls.writeline(wrapper, line)
    assert wrapper.lines == [line, line]
    assert cls.writeline is original


INTERPRETED = r"""
import torch
from imagegen.inductor_sums import column_sum, _column_sum
torch.manual_seed(0)
for S, R in ((1, 1), (37, 50), (300, 16), (129, 33)):
    x = torch.randn(S, R)
    for block_s, block_r in ((128, 16), (16, 8)):
        out = torch.empty(R)
        _column_sum[(-(-R // block_r),)](x, out, S, R, x.stride(0), BLOCK_S=block_s, BLOCK_R=block_r)
        err = ((out - x.sum(0)).abs().max() / x.abs().sum(0).max()).item()
        assert err < 1e-6, (S, R, block_s, block_r, err)
x = torch.randn(40, 24)[:, 4:20]  # a strided view of a wider tensor: column stride 1, row stride 24
out = torch.empty(16)
_column_sum[(1,)](x, out, 40, 16, x.stride(0), BLOCK_S=16, BLOCK_R=16)
assert torch.allclose(out, x.sum(0), atol=1e-5)
assert torch.equal(column_sum(x), x.sum(0))  # CPU tensors: torch's sum
print("interpreted ok")
"""


def test_column_sum_kernel_equals_torch_sum_in_the_interpreter():
    pytest.importorskip("triton")
    assert "interpreted ok" in run_python(INTERPRETED, TRITON_INTERPRET="1")


HOPPER_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from imagegen import inductor_sums as s
signature = {"X": "*fp32", "OUT": "*fp32", "S": "i32", "R": "i32", "stride": "i32", "BLOCK_S": "constexpr",
             "BLOCK_R": "constexpr"}
compiled = triton.compile(ASTSource(fn=s._column_sum, signature=signature,
                                    constexprs={"BLOCK_S": s.BLOCK_S, "BLOCK_R": s.BLOCK_R}),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": s.WARPS})
assert "cubin" in compiled.asm
print("compiled for sm_90")
"""


def test_column_sum_kernel_compiles_for_hopper(tmp_path):
    pytest.importorskip("triton")
    assert "compiled for sm_90" in run_python(HOPPER_COMPILE, TRITON_CACHE_DIR=str(tmp_path))
