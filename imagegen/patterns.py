"""Attention patterns over the raster token grid: pure definitions, the single source of truth.

An image of H rows x W columns with C tokens per pixel is a sequence of N = H*W*C tokens in raster
order; token t = (r*W + c)*C + ch and the row length is L = W*C (DESIGN.md section 2). A pattern says
which key k a query q may attend. Every pattern is causal (k <= q); with d = q - k:

    dense    d >= 0
    local    0 <= d < rows*L                  (the previous `rows` rows' worth, crossing row ends)
    column   d >= 0 and d % L == 0            (same column and channel in every earlier row)
    row      d >= 0 and q // L == k // L      (same image row; the axial ablation)
    strided  local or column                  (the paper's merged strided head)
    fixed    d >= 0 and (q // l == k // l or k % l >= l - c)   (block l, c summary cells)

A *layer spec* combines patterns the three ways of the Sparse Transformer paper:
    "local"              one pattern for every head
    "local+column"       merged: every head attends the union
    "local|column"       per-head: the heads are split evenly, first group local, second column
A model layout is a list of layer specs cycled over the layers (interleaving).

    >>> build_mask("column", 2, 2).int()
    tensor([[1, 0, 0, 0],
            [0, 1, 0, 0],
            [1, 0, 1, 0],
            [0, 1, 0, 1]], dtype=torch.int32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATTERNS = ("dense", "local", "column", "row", "strided", "fixed")


@dataclass(frozen=True)
class PatternParams:
    """Parameters of the patterns that take any; defaults follow the paper with l = row length."""

    rows: int = 1  # local: how many rows' worth of tokens each query sees
    block: int | None = None  # fixed: block length l (None: the row length L)
    summary: int = 8  # fixed: summary cells c at the end of each block (capped at l)

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"local pattern needs rows >= 1, got rows={self.rows}")
        if self.block is not None and self.block < 1:
            raise ValueError(f"fixed pattern needs block >= 1, got block={self.block}")
        if self.summary < 1:
            raise ValueError(f"fixed pattern needs summary >= 1, got summary={self.summary}")


def allowed(name: str, q: torch.Tensor, k: torch.Tensor, row_len: int, params: PatternParams = PatternParams()):
    """Elementwise rule: True where query index q may attend key index k (broadcasting tensors)."""
    d = q - k
    causal = d >= 0
    if name == "dense":
        return causal
    if name == "local":
        return causal & (d < params.rows * row_len)
    if name == "column":
        return causal & (d % row_len == 0)
    if name == "row":
        return causal & (q // row_len == k // row_len)
    if name == "strided":
        return allowed("local", q, k, row_len, params) | allowed("column", q, k, row_len, params)
    if name == "fixed":
        block = params.block or row_len
        summary = min(params.summary, block)
        return causal & ((q // block == k // block) | (k % block >= block - summary))
    raise ValueError(f"unknown attention pattern {name!r}; choose from {', '.join(PATTERNS)}")


@dataclass(frozen=True)
class LayerSpec:
    """How one layer's heads attend: `groups` of patterns, `merged` (union) or split per head."""

    groups: tuple[tuple[str, ...], ...]  # per-head groups; each group is a union of patterns

    @staticmethod
    def parse(spec: str) -> "LayerSpec":
        groups = []
        for group in spec.split("|"):
            names = tuple(n.strip() for n in group.split("+"))
            for n in names:
                if n not in PATTERNS:
                    raise ValueError(
                        f"unknown attention pattern {n!r} in layer spec {spec!r}; "
                        f"choose from {', '.join(PATTERNS)} (combine with '+' to merge, '|' to split heads)"
                    )
            groups.append(names)
        return LayerSpec(tuple(groups))

    def __str__(self) -> str:
        return "|".join("+".join(g) for g in self.groups)

    def head_groups(self, n_head: int) -> list[tuple[tuple[str, ...], int, int]]:
        """[(patterns, first_head, end_head)]: heads split evenly, in order, over the groups."""
        g = len(self.groups)
        if n_head % g:
            raise ValueError(f"layer spec {str(self)!r} splits heads {g} ways but the model has {n_head} heads")
        per = n_head // g
        return [(names, i * per, (i + 1) * per) for i, names in enumerate(self.groups)]


def parse_layout(layout) -> list[LayerSpec]:
    """A layout is a list of layer specs (strings), cycled over the layers; a bare string is one spec."""
    if isinstance(layout, str):
        layout = [layout]
    specs = [LayerSpec.parse(str(s)) for s in layout]
    if not specs:
        raise ValueError("attention layout is empty: give at least one layer spec, e.g. [local, column]")
    return specs


def union_mask(names, n: int, row_len: int, params: PatternParams, device=None) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    q, k = idx[:, None], idx[None, :]
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    for name in names:
        mask |= allowed(name, q, k, row_len, params)
    return mask


def build_mask(name: str, height: int, width: int, channels: int = 1, **params) -> torch.Tensor:
    """(N, N) bool mask, True where query (row index) may attend key (column index).

    `name` is a pattern name or a merged spec such as "local+column"; `params` are those of
    PatternParams (rows, block, summary).
    """
    for size, what in ((height, "height"), (width, "width"), (channels, "channels")):
        if size < 1:
            raise ValueError(f"grid {what} must be positive, got {size}")
    spec = LayerSpec.parse(name)
    if len(spec.groups) != 1:
        raise ValueError(f"build_mask takes one pattern or a merged union, not a per-head split: {name!r}")
    row_len = width * channels
    return union_mask(spec.groups[0], height * row_len, row_len, PatternParams(**params))


def layer_mask(spec: LayerSpec, n_head: int, height: int, width: int, channels: int,
               params: PatternParams, device=None) -> torch.Tensor:
    """(heads, N, N) mask of a whole layer, one slice per head (for the reference backend)."""
    row_len = width * channels
    n = height * row_len
    out = torch.empty(n_head, n, n, dtype=torch.bool, device=device)
    for names, h0, h1 in spec.head_groups(n_head):
        out[h0:h1] = union_mask(names, n, row_len, params, device)
    return out
