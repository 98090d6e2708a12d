"""The last sums of Inductor's mix-order reductions (a layer norm's backward) in one Triton kernel each.

Inductor compiles a layer norm's backward (dx, and dgamma, dbeta summed over every token) into one kernel that
writes partial sums of dgamma and dbeta, one row per split of the tokens, into a workspace; the wrapper then sums
each slice with an eager ATen call (torch._inductor.codegen.simd, "mix order reduction"):

    buf8 = workspace_0[0 * 2048 * 512 : (0 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)

That column reduction takes about 8 us for 2048 x 512 on an H200 and clears a buffer first (a memset), so a
12-layer step runs 50 of them and 50 memsets, 0.41-0.48 ms of kernels plus 100 launches (benchmarks/h200j). While
`installed`, the wrapper calls our Triton kernel instead, which reads each slice once. A kernel's sums (a layer
norm's dgamma and dbeta: consecutive slices of one workspace) come from one launch:

    _imagegen_sums = imagegen_column_sums(workspace_0, 2048, 512)     # every slice's sum, separate tensors
    buf8 = _imagegen_sums[0]
    buf9 = _imagegen_sums[1]

and a line whose sizes are not plain integers (dynamic shapes) from one launch each:

    buf8 = imagegen_column_sum(workspace_0[0 * s0 * 512 : (0 + 1) * s0 * 512].view(s0, 512))

Only these lines change, and only in Python wrappers (not cpp_wrapper); the sums are the same up to fp32 rounding
order. On an H200 (`scripts/benchmark.py sums`, 50 calls replayed from one CUDA graph, benchmarks/h200l/sums) a
2048 x 512 sum took 3.4 us against ATen's 8.7 us, 1536 x 512 3.2 against 8.2 us; the sparse training steps,
each in its own process beside its anchor, 18.25 against 18.45 ms (4096 x 8) and 14.69 against 14.92 ms
(12288 x 2), one launch per sum; a norm's two sums in one launch took 0.166-0.176 ms a step in 25 launches
against 0.241 ms in 50 (12288 x 2, benchmarks/h200m). The compiled code lands in Inductor's on-disk caches like any other, so code
compiled with and without this is told apart only by a fresh cache (TORCHINDUCTOR_CACHE_DIR) when timing one
against the other.

    with installed():                # around the first calls of a torch.compile'd function (when it compiles)
        loss = compiled_loss(tokens)
        loss.backward()

imagegen.lit installs it for compiled training and benchmark.py train around our models (not the anchor's);
IMAGEGEN_INDUCTOR_SUMS=0 turns it off.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENV = "IMAGEGEN_INDUCTOR_SUMS"
# "<buffer> = <workspace slice>.view(<splits>, <columns>).sum(dim=0)<.view(shape)><.to(dtype)>"
_FINAL_SUM = re.compile(r"^(?P<buffer>\w+) = (?P<partials>workspace\w*\[.*\]\.view\(.*\))\.sum\(dim=0\)(?P<rest>.*)$")
# the same line with integer sizes: slice <idx> of (S, R) slices laid end to end, "S" or "(S)" as Inductor prints them
_INT = r"\(?{}\)?"
_SLICE_SUM = re.compile(
    r"^(?P<buffer>\w+) = (?P<workspace>workspace\w*)\[(?P<idx>\d+) \* " + _INT.format(r"(?P<S>\d+)") + r" \* "
    + _INT.format(r"(?P<R>\d+)") + r" : \((?P=idx) \+ 1\) \* " + _INT.format("(?P=S)") + r" \* " + _INT.format("(?P=R)")
    + r"\]\.view\((?P=S), (?P=R)\)\.sum\(dim=0\)(?P<rest>.*)$")
_IMPORT = "from imagegen.inductor_sums import column_sum as imagegen_column_sum, column_sums as imagegen_column_sums"
_GROUP = "_imagegen_sums"  # the wrapper's local holding one workspace's sums
BLOCK_S, BLOCK_R, WARPS = 1024, 8, 8  # rows per step (the loads in flight), columns per program


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


if triton is not None:

    @triton.jit
    def _column_sums(X, OUT0, OUT1, OUT2, OUT3, S, R, stride, slice_stride, BLOCK_S: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        """OUTk[c] = sum over s of X[k * slice_stride + s * stride + c] for BLOCK_R columns c of slice k =
        program_id(1) (up to 4 slices, each its own output): a (BLOCK_S, BLOCK_R) fp32 tile accumulated down the
        rows, reduced once at the end."""
        k = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_S, BLOCK_R), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            acc += tl.load(X + k * slice_stride + rows[:, None] * stride + cols[None, :],
                           mask=(rows < S)[:, None] & (cols < R)[None, :], other=0.0).to(tl.float32)
        total = tl.sum(acc, 0)
        if k == 0:
            tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=cols < R)
        elif k == 1:
            tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=cols < R)
        elif k == 2:
            tl.store(OUT2 + cols, total.to(OUT2.dtype.element_ty), mask=cols < R)
        else:
            tl.store(OUT3 + cols, total.to(OUT3.dtype.element_ty), mask=cols < R)


def _launch(x: torch.Tensor, outs: list[torch.Tensor], S: int, R: int, stride: int, slice_stride: int,
            block_s: int = 0, block_r: int = 0, warps: int = 0) -> None:
    """The sums of len(outs) <= 4 slices of x into outs."""
    block_r = block_r or BLOCK_R
    padded = outs + [outs[0]] * (4 - len(outs))
    _column_sums[(triton.cdiv(R, block_r), len(outs))](x, *padded, S, R, stride, slice_stride,
                                                      BLOCK_S=block_s or BLOCK_S, BLOCK_R=block_r,
                                                      num_warps=warps or WARPS)


def column_sum(x: torch.Tensor, block_s: int = 0, block_r: int = 0, warps: int = 0) -> torch.Tensor:
    """x (S, R) with unit column stride -> x.sum(dim=0), by the Triton kernel where it runs (CUDA, Triton), else
    by torch. block_s, block_r, warps: launch settings (0: BLOCK_S, BLOCK_R, WARPS)."""
    if triton is None or not x.is_cuda or x.dim() != 2 or x.stride(1) != 1:
        return x.sum(dim=0)
    S, R = x.shape
    out = torch.empty(R, dtype=x.dtype, device=x.device)
    _launch(x, [out], S, R, x.stride(0), 0, block_s, block_r, warps)
    return out


def column_sums(workspace: torch.Tensor, S: int, R: int) -> tuple[torch.Tensor, ...]:
    """A contiguous 1-d workspace of (S, R) row-major slices laid end to end -> the column sum of each whole
    slice, (R,) each, separate tensors: sum k is workspace[k * S * R : (k + 1) * S * R].view(S, R).sum(dim=0). One
    kernel launch for up to 4 slices where it runs, else torch."""
    n = workspace.numel() // (S * R)
    slices = workspace[:n * S * R].view(n, S, R)
    if triton is None or not workspace.is_cuda:
        return tuple(s.sum(dim=0) for s in slices)
    outs = [torch.empty(R, dtype=workspace.dtype, device=workspace.device) for _ in range(n)]
    for first in range(0, n, 4):
        _launch(slices[first], outs[first:first + 4], S, R, R, S * R)
    return tuple(outs)


def rewrite(line: str, group: tuple | None = None) -> tuple[list[str], tuple | None] | None:
    """The wrapper lines for one of Inductor's final workspace sums, or None when `line` is not one. group: the
    (workspace, S, R) whose sums the wrapper's _imagegen_sums holds (what the previous call returned). Returns
    (lines, group after them): slice 0 of a workspace with integer sizes computes every slice's sum in one launch,
    its later slices read theirs; any other sum line calls imagegen_column_sum."""
    match = _SLICE_SUM.match(line)
    if match is not None:
        key, idx = (match["workspace"], int(match["S"]), int(match["R"])), int(match["idx"])
        if idx == 0:
            return [f"{_GROUP} = imagegen_column_sums({key[0]}, {key[1]}, {key[2]})",
                    f"{match['buffer']} = {_GROUP}[0]{match['rest']}"], key
        if key == group:
            return [f"{match['buffer']} = {_GROUP}[{idx}]{match['rest']}"], group
    match = _FINAL_SUM.match(line)
    if match is None:
        return None
    return [f"{match['buffer']} = imagegen_column_sum({match['partials']}){match['rest']}"], None


def _wrapper_class():
    from torch._inductor.codegen import wrapper
    return getattr(wrapper, "PythonWrapperCodegen", None) or getattr(wrapper, "WrapperCodeGen", None)


@contextlib.contextmanager
def installed(active: bool = True):
    """While active (and IMAGEGEN_INDUCTOR_SUMS is not 0), Inductor's Python wrappers write the final sums of
    mix-order reductions as imagegen_column_sums / imagegen_column_sum calls (each after its import line)."""
    cls = _wrapper_class() if active and enabled() else None
    if cls is None:
        yield
        return
    original = cls.writeline

    def writeline(self, line):
        new = rewrite(line, getattr(self, "_imagegen_group", None)) if isinstance(line, str) else None
        if new is None or _cpp_wrapper():  # (the graph's wrapper mode, looked up for the rare matching line)
            return original(self, line)
        lines, self._imagegen_group = new
        original(self, _IMPORT)  # where the lines run (a module already imported: a lookup)
        for new_line in lines:
            original(self, new_line)

    cls.writeline = writeline
    try:
        yield
    finally:
        cls.writeline = original


def _cpp_wrapper() -> bool:
    from torch._inductor.virtualized import V
    try:
        return bool(V.graph.cpp_wrapper)
    except (AttributeError, AssertionError):  # no graph being lowered
        return False
