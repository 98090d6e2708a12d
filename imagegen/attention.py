"""Attention backends for the patterns of imagegen.patterns; all are exact, none is approximate.

Inputs and outputs are (B, N, heads, D): the QKV projection's token order, so that `row` and `column`
are views of the sequence (DESIGN.md section 4; our kernels take strided slices as they are, the axial
path copies where a view cannot express the layout). Backends:

    reference  build_mask + masked SDPA: any pattern, CPU and GPU, O(N^2) memory (the ground truth)
    axial      `row` and `column` as views of the sequence, SDPA/FlashAttention underneath
    banded     `local` as each row of queries against its window of (rows+1) rows of keys: O(N*L)
               memory, exact, with a backward on CPU and GPU
    triton     our Triton kernels (CUDA, bf16/fp16): `column` and `row` as one program per short sequence
               of at most 128 tokens (imagegen.short_attention), `local` as a band over 64 x 64 tiles with
               an atomic-free backward (imagegen.band_attention); on an H200 their GPU time is 0.18-0.22
               ms for column vs 0.49-0.65 (cuDNN) and 0.54 ms for local vs 0.83-0.90 (flash) (README)
    flash      `local` as FlashAttention-2's sliding window (CUDA, bf16/fp16): the varlen kernel over the
               (B*N, heads, D) view of the projection with window (rows*L - 1, 0): no mask, no copy, and
               only the key blocks inside the band are visited (imagegen.window_attention)
    flex       FlexAttention (CUDA only: it has no CPU backward), any pattern as a mask_mod; compiled,
               one BlockMask per (pattern, grid, device), and a recompile-limit hit raises instead of
               silently falling back to the O(N^2) eager path
    auto       the fastest exact backend per pattern, device and dtype (reference only where nothing
               else fits): on CUDA in bf16/fp16 local -> triton, column/row -> triton (axial for rows
               longer than 128 tokens), then flash / flex for local where triton cannot run; dense ->
               FlashAttention, other patterns and unions -> flex; on CPU local -> banded, column/row -> axial

`attend(q, k, v, spec, grid, params, backend)` runs one layer spec (several head groups, each a pattern
or a merged union); `supports(backend, names)` says whether a backend can run a head group.
`attend_packed(qkv, spec, grid, params, backend)` is what the model calls with its one (B, N, 3, h, D)
projection: a layer on one of our Triton kernels reads q, k, v in place and gets one packed gradient
back; any other layer goes through `attend` on the three strided slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from imagegen.band_attention import band_attention, band_attention_packed, band_attention_runs
from imagegen.patterns import LayerSpec, PatternParams, union_mask
from imagegen.short_attention import (
    sequences,
    short_attention_runs,
    short_causal_attention,
    short_causal_attention_packed,
)
from imagegen.window_attention import flash_window_runs, window_attention

BACKENDS = ("auto", "reference", "axial", "triton", "banded", "flash", "flex")


@dataclass(frozen=True)
class Grid:
    """The token grid: `height` rows of `width` pixels of `channels` tokens."""

    height: int
    width: int
    channels: int = 1

    @property
    def row_len(self) -> int:
        return self.width * self.channels

    @property
    def num_tokens(self) -> int:
        return self.height * self.row_len

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}"


def _sdpa_heads_first(q, k, v, **kw):
    """SDPA on (B, N, h, D) tensors (heads moved to dim 1 as strided views)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return y.transpose(1, 2)  # (B, N, h, D)


def dense_attention(q, k, v, grid: Grid):
    return _sdpa_heads_first(q, k, v, is_causal=True)


@lru_cache(maxsize=32)
def _cached_mask(names: tuple[str, ...], grid: Grid, params: PatternParams, device: torch.device):
    return union_mask(names, grid.num_tokens, grid.row_len, params, device)


def reference_attention(q, k, v, grid: Grid, names=("dense",), params: PatternParams = PatternParams()):
    mask = _cached_mask(tuple(names), grid, params, q.device)  # (N, N), built once per shape/device
    return _sdpa_heads_first(q, k, v, attn_mask=mask)


def column_attention(q, k, v, grid: Grid):
    """Same column and channel in every earlier row: sequence = image rows, (L, heads) = heads."""
    B, N, h, D = q.shape
    H, L = grid.height, grid.row_len

    def view(t):  # (B, N, h, D) -> (B, H, L*h, D) -> (B, L*h, H, D); no copy when t is contiguous
        return t.reshape(B, H, L * h, D).transpose(1, 2)

    y = F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=True)  # (B, L*h, H, D)
    return y.transpose(1, 2).reshape(B, N, h, D)


def row_attention(q, k, v, grid: Grid):
    """Same image row only: batch = (B, image rows), sequence = the row."""
    B, N, h, D = q.shape
    H, L = grid.height, grid.row_len

    def view(t):  # (B, N, h, D) -> (B*H, L, h, D) -> (B*H, h, L, D)
        return t.reshape(B * H, L, h, D).transpose(1, 2)

    y = F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=True)  # (B*H, h, L, D)
    return y.transpose(1, 2).reshape(B, N, h, D)


def _axial_length(grid: Grid, axis: str) -> int:
    return grid.height if axis == "column" else grid.row_len


def triton_axial_attention(q, k, v, grid: Grid, axis: str = "column"):
    """`column` or `row` through imagegen.short_attention: (B, N, h, D) -> (B, N, h, D)."""
    B, N, h, D = q.shape
    if not short_attention_runs(q, _axial_length(grid, axis)):
        raise RuntimeError(f"the triton backend needs CUDA, bf16/fp16 inputs, head dim 16/32/64/128 and a "
                           f"{axis} of at most 128 tokens (got {_axial_length(grid, axis)}); "
                           "use backend=auto or axial")
    column = axis == "column"
    return short_causal_attention(*(sequences(t, grid.height, column) for t in (q, k, v))).view(B, N, h, D)


def triton_local_attention(q, k, v, grid: Grid, rows: int = 1):
    if not band_attention_runs(q):
        raise RuntimeError("the triton backend needs CUDA, bf16/fp16 inputs and head dim 16/32/64/128; "
                           "use backend=auto")
    return band_attention(q, k, v, window=rows * grid.row_len)


def triton_column_attention(q, k, v, grid: Grid):
    return triton_axial_attention(q, k, v, grid, "column")


def triton_row_attention(q, k, v, grid: Grid):
    return triton_axial_attention(q, k, v, grid, "row")


_TRITON_KERNELS = {"column": triton_column_attention, "row": triton_row_attention, "local": triton_local_attention}


@lru_cache(maxsize=32)
def _band_mask(grid: Grid, rows: int, device: torch.device):
    """(H, 1, L, (rows+1)*L): query i of image row r against key j of the window starting at row r-rows."""
    H, L = grid.height, grid.row_len
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange((rows + 1) * L, device=device)[None, :]
    r = torch.arange(H, device=device)[:, None, None]
    d = rows * L + i - j  # distance q - k
    exists = (r - rows) * L + j >= 0  # window keys before token 0 are padding
    return ((d >= 0) & (d < rows * L) & exists)[:, None]


def banded_local_attention(q, k, v, grid: Grid, rows: int = 1):
    """`local` exactly, without an N x N mask: each image row of queries sees its (rows+1)-row window."""
    B, N, h, D = q.shape
    H, L = grid.height, grid.row_len
    if rows >= H:  # the band covers the whole image: plain causal attention
        return dense_attention(q, k, v, grid)

    def windows(t):  # (B, N, h, D) -> (B*H, h, (rows+1)*L, D), the keys of each query row
        t = t.reshape(B, H, L, h, D)
        t = torch.cat([t.new_zeros(B, rows, L, h, D), t], dim=1)  # (B, H+rows, L, h, D)
        t = t.unfold(1, rows + 1, 1)  # (B, H, L, h, D, rows+1)
        return t.permute(0, 1, 3, 5, 2, 4).reshape(B * H, h, (rows + 1) * L, D)

    qr = q.reshape(B, H, L, h, D).permute(0, 1, 3, 2, 4).reshape(B * H, h, L, D)
    mask = _band_mask(grid, rows, q.device).repeat(B, 1, 1, 1)  # (B*H, 1, L, (rows+1)*L)
    y = F.scaled_dot_product_attention(qr, windows(k), windows(v), attn_mask=mask)  # (B*H, h, L, D)
    return y.view(B, H, h, L, D).permute(0, 1, 3, 2, 4).reshape(B, N, h, D)


@lru_cache(maxsize=1)
def _compiled_flex():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # name differs across torch versions
        if hasattr(dynamo_config, flag):
            setattr(dynamo_config, flag, True)
    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=32)
def _block_mask(names: tuple[str, ...], grid: Grid, params: PatternParams, device: torch.device, block: int = 128):
    from torch.nn.attention.flex_attention import create_block_mask

    from imagegen.patterns import allowed

    def mask_mod(b, h, q, k):
        keep = allowed(names[0], q, k, grid.row_len, params)
        for name in names[1:]:
            keep = keep | allowed(name, q, k, grid.row_len, params)
        return keep

    n = grid.num_tokens
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block)


# Kernel tiles that fit a BlockMask of 64 x 64 blocks (forward BLOCK_M/N, backward M1/N1 and M2/N2): a
# narrow band then visits fewer masked-out keys than with the default 128 x 128 tiles.
_SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def flex_attention_pattern(q, k, v, grid: Grid, names=("local",), params: PatternParams = PatternParams(),
                           block: int = 128):
    """Any pattern or union as a FlexAttention mask; `block` is the BlockMask granularity (128 or 64)."""
    if not q.is_cuda:
        raise RuntimeError("the flex backend runs on CUDA only (FlexAttention has no CPU backward); "
                           "use backend=auto or banded/reference on a CPU")
    block_mask = _block_mask(tuple(names), grid, params, q.device, block)
    options = _SMALL_TILES if block == 64 else None
    y = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                         kernel_options=options)
    return y.transpose(1, 2)  # (B, N, h, D)


def flash_local_attention(q, k, v, grid: Grid, rows: int = 1):
    """`local` = causal attention within a window of rows*L keys (d = q - k < rows*L)."""
    if not flash_window_runs(q):
        raise RuntimeError("the flash backend needs CUDA, bf16 or fp16 inputs and a torch whose FlashAttention "
                           "takes a window size; use backend=auto")
    return window_attention(q, k, v, window=rows * grid.row_len)


def _triton_runs(single: str | None, q: torch.Tensor, grid: Grid) -> bool:
    """Our Triton kernels can run this pattern on q: what `auto` prefers on CUDA (their GPU time is below
    flash's and cuDNN's on every shape of the attention table, `scripts/benchmark.py calls`)."""
    if single == "local":
        return band_attention_runs(q)
    if single in ("column", "row"):
        return short_attention_runs(q, _axial_length(grid, single))
    return False


def _kernel(names: tuple[str, ...], backend: str, q: torch.Tensor | None = None, grid: Grid | None = None):
    """The function that runs one head group, or None when `backend` cannot run it (then: reference).
    Without `q` and `grid` it answers for any input (to validate a forced backend before any work)."""
    single = names[0] if len(names) == 1 else None
    on_cuda = q is not None and q.is_cuda
    if backend == "reference":
        return None
    if backend == "triton" or (backend == "auto" and q is not None and grid is not None
                               and _triton_runs(single, q, grid)):
        return _TRITON_KERNELS.get(single)
    if backend == "flash" or (backend == "auto" and single == "local" and q is not None and flash_window_runs(q)):
        return flash_local_attention if single == "local" else None
    if backend == "flex" or (backend == "auto" and on_cuda and single not in ("dense", "row", "column")):
        return flex_attention_pattern  # any pattern is a mask_mod; on CUDA it beats the N x N reference
    if backend in ("auto", "axial"):
        if single == "column":
            return column_attention
        if single == "row":
            return row_attention
    if backend in ("auto", "banded") and single == "local":
        return banded_local_attention
    if backend == "auto" and single == "dense":
        return dense_attention
    return None


def supports(backend: str, names: tuple[str, ...]) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return backend in ("auto", "reference") or _kernel(names, backend) is not None


def check_layout(specs: list[LayerSpec], backend: str) -> None:
    """Fail before any work when a forced backend cannot run a pattern of the layout."""
    for spec in specs:
        for names in spec.groups:
            if not supports(backend, names):
                raise ValueError(
                    f"attention backend {backend!r} cannot run pattern {'+'.join(names)!r}; "
                    "use backend=auto (picks per pattern) or backend=reference"
                )


def attend(q, k, v, spec: LayerSpec, grid: Grid, params: PatternParams, backend: str = "auto"):
    """One layer's attention: (B, N, h, D) x 3 -> (B, N, h, D), head groups run by their backends."""
    outs = []
    groups = spec.head_groups(q.shape[2])
    for names, h0, h1 in groups:
        qs, ks, vs = (q, k, v) if len(groups) == 1 else (t[:, :, h0:h1] for t in (q, k, v))
        kernel = _kernel(names, backend, q, grid)
        if kernel in (banded_local_attention, flash_local_attention, triton_local_attention):
            outs.append(kernel(qs, ks, vs, grid, rows=params.rows))
        elif kernel is flex_attention_pattern:
            outs.append(kernel(qs, ks, vs, grid, names, params))
        elif kernel is not None:
            outs.append(kernel(qs, ks, vs, grid))
        else:
            outs.append(reference_attention(qs, ks, vs, grid, names, params))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_packed(qkv, spec: LayerSpec, grid: Grid, params: PatternParams, backend: str = "auto"):
    """One layer's attention on its packed projection: (B, N, 3, h, D) -> (B, N, h, D). When the whole layer
    runs on one of our Triton kernels (one head group of `local`, `column` or `row`), the kernels read q, k,
    v in place and the backward writes one packed gradient, so the projection's backward is one dgrad and
    one wgrad GEMM with nothing copied; otherwise `attend` on the three strided slices."""
    q, k, v = qkv.unbind(2)  # each (B, N, h, D)
    groups = spec.head_groups(qkv.shape[3])
    single = groups[0][0][0] if len(groups) == 1 and len(groups[0][0]) == 1 else None
    if backend in ("auto", "triton") and _triton_runs(single, q, grid):
        if single == "local":
            return band_attention_packed(qkv, window=params.rows * grid.row_len)
        return short_causal_attention_packed(qkv, grid.height, single == "column")
    return attend(q, k, v, spec, grid, params, backend)
