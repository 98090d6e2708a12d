"""Pictures of attention patterns: masks side by side, and receptive fields on the image grid.

    masks_picture(["dense", "local", "column", "strided"], 6, 6)      # N x N masks, like the paper's figure
    receptive_field_picture({"sparse": ["local", "column"], "axial": ["row", "column"]}, 12, 12)

Both return PIL images; scripts/visualize_patterns.py writes them as PNG and training logs them at start.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from imagegen.patterns import LayerSpec, PatternParams, build_mask, union_mask

QUERY = (230, 60, 40)  # the query pixel / row
SEEN = (40, 110, 200)  # keys it may attend, or pixels it can draw on
FREE = (240, 240, 240)
GRID = (200, 200, 200)


def _title(canvas: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (canvas.width, canvas.height + 18), "white")
    out.paste(canvas, (0, 18))
    ImageDraw.Draw(out).text((4, 3), text, fill="black")
    return out


def _hstack(images: list[Image.Image], gap: int = 10) -> Image.Image:
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def _vstack(images: list[Image.Image], gap: int = 10) -> Image.Image:
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
                    "white")
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height + gap
    return out


def mask_image(mask: torch.Tensor, query: int | None = None, cell: int = 6) -> Image.Image:
    """(N, N) mask as a picture: row = query, column = key; the row of `query` is highlighted."""
    n = mask.shape[0]
    rgb = torch.tensor(FREE, dtype=torch.uint8).repeat(n, n, 1)
    rgb[mask] = torch.tensor(SEEN, dtype=torch.uint8)
    if query is not None:
        rgb[query][mask[query]] = torch.tensor(QUERY, dtype=torch.uint8)
    img = Image.fromarray(rgb.numpy()).resize((n * cell, n * cell), Image.NEAREST)
    return img


def grid_image(seen: torch.Tensor, height: int, width: int, channels: int, query: int, cell: int = 14) -> Image.Image:
    """Which pixels (any channel) a token can draw on, drawn on the H x W image grid."""
    per_pixel = seen.view(height, width, channels).any(-1)  # (H, W)
    img = Image.new("RGB", (width * cell, height * cell), FREE)
    draw = ImageDraw.Draw(img)
    qr, qc = divmod(query // channels, width)
    for r in range(height):
        for c in range(width):
            fill = QUERY if (r, c) == (qr, qc) else SEEN if per_pixel[r, c] else FREE
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=fill, outline=GRID)
    return img


def masks_picture(patterns: list[str], height: int = 6, width: int = 6, channels: int = 1, **params) -> Image.Image:
    """Each pattern's N x N mask side by side; one query row highlighted."""
    n = height * width * channels
    query = n - width * channels // 2 - 1 if n > 1 else 0
    panels = [_title(mask_image(build_mask(p, height, width, channels, **params), query), p) for p in patterns]
    return _hstack(panels)


def reachable(layout: list[str], layers: int, height: int, width: int, channels: int, query: int,
              n_head: int = 2, params: PatternParams = PatternParams()) -> torch.Tensor:
    """(N,) bool: tokens whose information reaches `query` after `layers` layers of the layout."""
    specs = [LayerSpec.parse(s) for s in layout]
    n_head = max(len(s.groups) for s in specs) * n_head  # enough heads for every per-head split
    n, row_len = height * width * channels, width * channels
    seen = torch.zeros(n, dtype=torch.bool)
    seen[query] = True
    for i in reversed(range(layers)):  # walk back from the last layer to the input
        spec = specs[i % len(specs)]
        layer = torch.zeros(n, n, dtype=torch.bool)
        for names, _, _ in spec.head_groups(n_head):
            layer |= union_mask(names, n, row_len, params)
        seen = (seen.float() @ layer.float() > 0) | seen  # residual: a token keeps what it had
    return seen


def receptive_field_picture(layouts: dict[str, list[str]], height: int = 12, width: int = 12, channels: int = 1,
                            layers=(1, 2, 3), query: int | None = None) -> Image.Image:
    """One row per layout: what one pixel (default: the middle of the second-to-last row) can see after
    1, 2, 3 layers. With local/column every earlier pixel is reached in two; with row/column never."""
    n = height * width * channels
    query = query if query is not None else ((height - 2) * width + width // 2) * channels
    rows = []
    for name, layout in layouts.items():
        panels = [_title(grid_image(reachable(layout, k, height, width, channels, query), height, width, channels,
                                    query), f"{name} ({'/'.join(layout)}): {k} layer{'s' if k > 1 else ''}")
                  for k in layers]
        rows.append(_hstack(panels))
    causal = torch.arange(n) <= query
    rows.append(_title(grid_image(causal, height, width, channels, query), "every earlier pixel (the goal)"))
    return _vstack(rows)
