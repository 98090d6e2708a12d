"""build_mask against a brute-force reading of DESIGN.md section 3, and the receptive-field facts."""

import itertools

import pytest
import torch

from imagegen.patterns import PATTERNS, build_mask, layer_mask, LayerSpec, PatternParams

GRIDS = [(3, 4, 1), (4, 3, 3), (5, 7, 1), (2, 5, 3), (6, 6, 1), (11, 13, 1)]  # H != W, C = 3, N % 128 != 0


def brute_force(name, H, W, C, rows=1, block=None, summary=8):
    """Loop over every (q, k) pair and apply the table of DESIGN.md section 3 literally."""
    L = W * C
    N = H * L
    l = block or L
    c = min(summary, l)
    m = torch.zeros(N, N, dtype=torch.bool)
    for q, k in itertools.product(range(N), range(N)):
        d = q - k
        if d < 0:
            continue
        local = d < rows * L
        column = d % L == 0
        rule = {
            "dense": True,
            "local": local,
            "column": column,
            "row": q // L == k // L,
            "strided": local or column,
            "fixed": q // l == k // l or k % l >= l - c,
        }[name]
        m[q, k] = rule
    return m


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("H,W,C", GRIDS)
def test_build_mask_matches_brute_force(name, H, W, C):
    assert torch.equal(build_mask(name, H, W, C), brute_force(name, H, W, C))


@pytest.mark.parametrize("params", [dict(rows=2), dict(rows=3)])
def test_local_rows_parameter(params):
    assert torch.equal(build_mask("local", 5, 4, 3, **params), brute_force("local", 5, 4, 3, **params))


@pytest.mark.parametrize("params", [dict(block=5, summary=2), dict(block=16, summary=4), dict(block=3, summary=9)])
def test_fixed_parameters(params):
    assert torch.equal(build_mask("fixed", 4, 6, 1, **params), brute_force("fixed", 4, 6, 1, **params))


def test_merged_spec_is_union():
    assert torch.equal(build_mask("local+column", 4, 5, 3), build_mask("strided", 4, 5, 3))
    assert torch.equal(build_mask("row+column", 4, 5, 1), build_mask("row", 4, 5, 1) | build_mask("column", 4, 5, 1))


def test_per_head_layer_mask_splits_heads_in_order():
    m = layer_mask(LayerSpec.parse("local|column"), 4, 3, 4, 1, PatternParams())
    assert torch.equal(m[0], build_mask("local", 3, 4)) and torch.equal(m[1], build_mask("local", 3, 4))
    assert torch.equal(m[2], build_mask("column", 3, 4)) and torch.equal(m[3], build_mask("column", 3, 4))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown attention pattern 'diagonal'"):
        build_mask("diagonal", 4, 4)
    with pytest.raises(ValueError, match="positive"):
        build_mask("local", 0, 4)
    with pytest.raises(ValueError, match="rows"):
        build_mask("local", 4, 4, rows=0)
    with pytest.raises(ValueError, match="splits heads 3 ways"):
        LayerSpec.parse("local|column|row").head_groups(8)


def reach_after(masks):
    """Which keys each query can draw information from after the layers in order (boolean matmul)."""
    n = masks[0].shape[0]
    reach = torch.eye(n, dtype=torch.bool)
    for m in masks:
        reach = (m.float() @ reach.float()) > 0
    return reach


@pytest.mark.parametrize("H,W,C", [(6, 5, 1), (4, 4, 3), (8, 8, 1)])
def test_local_then_column_reaches_every_earlier_token_in_two_layers(H, W, C):
    causal = build_mask("dense", H, W, C)
    local, column = build_mask("local", H, W, C), build_mask("column", H, W, C)
    assert torch.equal(reach_after([local, column]), causal)
    assert torch.equal(reach_after([column, local]), causal)
    assert not torch.equal(local, causal) and not torch.equal(column, causal)  # one layer is not enough


@pytest.mark.parametrize("H,W,C", [(6, 5, 1), (4, 4, 3)])
def test_row_column_axial_has_a_blind_spot(H, W, C):
    """Naive axial attention never sees the upper-right part of the image, however many layers."""
    causal = build_mask("dense", H, W, C)
    row, column = build_mask("row", H, W, C), build_mask("column", H, W, C)
    reach = reach_after([row, column, row, column])
    assert (causal & ~reach).any()
    L = W * C
    q = 2 * L  # first token of the third image row
    k = 1 * L + L - 1  # last token of the row above, to its upper right
    assert causal[q, k] and not reach[q, k]
