"""imagegen.inductor_sums: Inductor's final workspace sums rewritten to one Triton kernel each. On a CPU: the
rewrite of the wrapper lines, its install and removal, the kernel in Triton's interpreter and compiled for sm_90.
The compiled layer norm on a GPU: test_gpu.py."""

import types

import pytest
from conftest import COMPILE_FOR_HOPPER, run_python

from imagegen import inductor_sums

# a layer norm's two sums as torch 2.11 writes them, and as later versions do (parenthesised sizes, a view and a cast
# after): one launch for both, the second line reads its sum
GROUPS = [
    (["buf8 = workspace_0[0 * 2048 * 512 : (0 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)",
      "buf9 = workspace_0[1 * 2048 * 512 : (1 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)"],
     ["_imagegen_sums = imagegen_column_sums(workspace_0, 2048, 512)", "buf8 = _imagegen_sums[0]",
      "buf9 = _imagegen_sums[1]"]),
    ([("buf10 = workspace_1[0 * (1536) * (512) : (0 + 1) * (1536) * (512)].view(1536, 512).sum(dim=0).view([512])"
       ".to(torch.bfloat16)"),
      ("buf11 = workspace_1[1 * (1536) * (512) : (1 + 1) * (1536) * (512)].view(1536, 512).sum(dim=0).view([512])"
       ".to(torch.bfloat16)")],
     ["_imagegen_sums = imagegen_column_sums(workspace_1, 1536, 512)",
      "buf10 = _imagegen_sums[0].view([512]).to(torch.bfloat16)", "buf11 = _imagegen_sums[1].view([512]).to(torch.bfloat16)"]),
]
# sizes that are not integers (dynamic shapes), and a later slice whose first was not seen: one sum each
SINGLE = {
    "buf3 = workspace_0[0 * s0 * 512 : (0 + 1) * s0 * 512].view(s0, 512).sum(dim=0)":
        "buf3 = imagegen_column_sum(workspace_0[0 * s0 * 512 : (0 + 1) * s0 * 512].view(s0, 512))",
    "buf4 = workspace_2[1 * 64 * 8 : (1 + 1) * 64 * 8].view(64, 8).sum(dim=0)":
        "buf4 = imagegen_column_sum(workspace_2[1 * 64 * 8 : (1 + 1) * 64 * 8].view(64, 8))",
}
UNTOUCHED = ["buf3 = workspace_0[0 * 64 * 8 : (0 + 1) * 64 * 8].view(64, 8).amax(dim=0)",  # another reduction
             "buf5 = buf4.sum(dim=0)", "del workspace_0"]


def _rewritten(lines: list[str]) -> list[str]:
    out, group = [], None
    for line in lines:
        new, group = inductor_sums.rewrite(line, group) or ([line], group)
        out += new
    return out


def test_rewrite_turns_a_workspaces_final_sums_into_one_column_sums_call():
    for lines, expected in GROUPS:
        assert _rewritten(lines) == expected
    assert _rewritten(GROUPS[0][0] + GROUPS[1][0]) == GROUPS[0][1] + GROUPS[1][1]
    for line, expected in SINGLE.items():
        assert _rewritten([line]) == [expected]
    # a later slice of another workspace than the last group's: its own sum
    assert _rewritten([GROUPS[0][0][0], GROUPS[1][0][1]])[-1].startswith("buf11 = imagegen_column_sum(workspace_1[")
    for line in UNTOUCHED:
        assert inductor_sums.rewrite(line) is None


def test_installed_rewrites_wrapper_lines_and_restores_the_wrapper(monkeypatch):
    pytest.importorskip("torch._inductor.codegen.wrapper")
    cls = inductor_sums._wrapper_class()
    original = cls.writeline
    lines, expected = GROUPS[0]
    wrapper = types.SimpleNamespace(lines=[])  # what PythonWrapperCodegen.writeline appends to
    with inductor_sums.installed():
        for line in lines:
            cls.writeline(wrapper, line)
        cls.writeline(wrapper, UNTOUCHED[1])
    assert cls.writeline is original
    imports = [inductor_sums._IMPORT]
    assert wrapper.lines == imports + expected[:2] + imports + expected[2:] + [UNTOUCHED[1]]
    wrapper.lines.clear()
    with inductor_sums.installed(active=False):
        cls.writeline(wrapper, lines[0])
    monkeypatch.setenv(inductor_sums.ENV, "0")
    with inductor_sums.installed():
        cls.writeline(wrapper, lines[0])
    assert wrapper.lines == [lines[0], lines[0]]
    assert cls.writeline is original


INTERPRETED = r"""
import torch
from imagegen.inductor_sums import column_sum, column_sums, _column_sums
torch.manual_seed(0)
for n, S, R in ((1, 1, 1), (2, 37, 50), (4, 300, 16), (3, 129, 33)):
    ws = torch.randn(n * S * R + 5)  # n slices end to end, and a tail that is no whole slice
    for block_s, block_r in ((128, 16), (16, 8)):
        outs = [torch.empty(R) for _ in range(n)]
        _column_sums[(-(-R // block_r), n)](ws, *(outs + outs[:1] * (4 - n)), S, R, R, S * R, BLOCK_S=block_s,
                                           BLOCK_R=block_r)
        for k, out in enumerate(outs):
            ref = ws[k * S * R:(k + 1) * S * R].view(S, R).sum(0)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-6, (n, S, R, k, block_s, block_r, err)
x = torch.randn(40, 24)[:, 4:20]  # a strided view of a wider tensor: column stride 1, row stride 24
outs = [torch.empty(16)]
_column_sums[(1, 1)](x, *(outs * 4), 40, 16, x.stride(0), 0, BLOCK_S=16, BLOCK_R=16)
assert torch.allclose(outs[0], x.sum(0), atol=1e-5)
assert torch.equal(column_sum(x), x.sum(0))  # CPU tensors: torch's sums
ws = torch.randn(6 * 7 * 5)
assert all(torch.equal(a, ws.view(6, 7, 5)[k].sum(0)) for k, a in enumerate(column_sums(ws, 7, 5)))
print("interpreted ok")
"""


def test_column_sum_kernel_equals_torch_sum_in_the_interpreter(triton_interpreter):
    assert "interpreted ok" in run_python(INTERPRETED, TRITON_INTERPRET="1")


HOPPER_COMPILE = r"""
from imagegen import inductor_sums as s
signature = {"X": "*fp32", "OUT0": "*fp32", "OUT1": "*fp32", "OUT2": "*fp32", "OUT3": "*fp32", "S": "i32", "R": "i32",
             "stride": "i32", "slice_stride": "i32", "BLOCK_S": "constexpr", "BLOCK_R": "constexpr"}
compiled = compile_for_hopper(s._column_sums, signature, {"BLOCK_S": s.BLOCK_S, "BLOCK_R": s.BLOCK_R},
                              num_warps=s.WARPS)
assert "cubin" in compiled.asm
print("compiled for sm_90")
"""


def test_column_sum_kernel_compiles_for_hopper(tmp_path):
    pytest.importorskip("triton")
    assert "compiled for sm_90" in run_python(COMPILE_FOR_HOPPER + HOPPER_COMPILE, TRITON_CACHE_DIR=str(tmp_path))
