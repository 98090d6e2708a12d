"""Image tokenizers: uint8 RGB images (B, H, W, 3) <-> token sequences (B, N) in raster order.

    subpixel  8-bit RGB, 3 tokens a pixel, vocab 256, lossless (Sparse Transformer); NLL in bits/dim
    palette   k-means colour palette, 1 token a pixel (ImageGPT); lossy, NLL in bits per token

Both are nn.Modules so that a fitted palette is a buffer that travels with the checkpoint.

    tok = build_tokenizer({"name": "palette", "num_colors": 512})
    tok.fit(pixels)                 # uint8 (P, 3) training pixels; fixed seed
    tokens = tok.encode(images)     # (B, H*W*channels) long
    images = tok.decode(tokens)     # (B, H, W, 3); square unless height/width are given
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SubpixelTokenizer(nn.Module):
    name = "subpixel"
    channels = 3
    metric = "bits_per_dim"

    def __init__(self):
        super().__init__()
        self.vocab_size = 256

    @property
    def is_fitted(self) -> bool:
        return True

    def config(self) -> dict:
        return {"name": self.name}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return images.reshape(images.shape[0], -1).long()  # (B, H, W, 3) -> (B, H*W*3)

    def decode(self, tokens: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        height, width = _image_shape(tokens, self.channels, height, width)
        return tokens.clamp(0, 255).to(torch.uint8).reshape(tokens.shape[0], height, width, 3)


class PaletteTokenizer(nn.Module):
    name = "palette"
    channels = 1
    metric = "bits_per_token"

    def __init__(self, num_colors: int = 512, seed: int = 0, iters: int = 20, fit_pixels: int = 200_000):
        super().__init__()
        if num_colors < 2:
            raise ValueError(f"palette needs at least 2 colours, got num_colors={num_colors}")
        self.vocab_size = num_colors
        self.seed, self.iters, self.fit_pixels = seed, iters, fit_pixels
        self.register_buffer("palette", torch.zeros(num_colors, 3))  # centroids, RGB in [0, 255]
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def config(self) -> dict:
        return {"name": self.name, "num_colors": self.vocab_size, "seed": self.seed, "iters": self.iters,
                "fit_pixels": self.fit_pixels}

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor) -> "PaletteTokenizer":
        """k-means (Lloyd, k-means++ start) on uint8 (P, 3) pixels, deterministic for a seed."""
        pixels = pixels.reshape(-1, 3).float()
        if pixels.shape[0] == 0:
            raise ValueError("cannot fit a palette on zero pixels")
        g = torch.Generator().manual_seed(self.seed)
        if pixels.shape[0] > self.fit_pixels:
            pixels = pixels[torch.randperm(pixels.shape[0], generator=g)[: self.fit_pixels]]
        k = self.vocab_size
        centers = _kmeans_pp(pixels, k, g)
        for _ in range(self.iters):
            assign = _nearest(pixels, centers)
            sums = torch.zeros(k, 3).index_add_(0, assign, pixels)
            counts = torch.bincount(assign, minlength=k).float()
            moved = counts > 0  # an empty cluster keeps its centre
            centers[moved] = sums[moved] / counts[moved, None]
        order = torch.argsort(centers @ torch.tensor([65536.0, 256.0, 1.0]))  # stable colour order
        self.palette.copy_(centers[order])
        self.fitted.fill_(True)
        return self

    def _require_fitted(self):
        if not self.is_fitted:
            raise RuntimeError("palette tokenizer is not fitted: call fit(pixels) or load a checkpoint")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        self._require_fitted()
        B = images.shape[0]
        with torch.autocast(images.device.type, enabled=False):  # distances need fp32, not bf16
            return _nearest(images.reshape(-1, 3).float(), self.palette.float()).view(B, -1)  # (B, H*W)

    def decode(self, tokens: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        self._require_fitted()
        height, width = _image_shape(tokens, self.channels, height, width)
        rgb = self.palette[tokens.clamp(0, self.vocab_size - 1)]  # (B, N, 3)
        return rgb.round().clamp(0, 255).to(torch.uint8).reshape(tokens.shape[0], height, width, 3)


def _nearest(points: torch.Tensor, centers: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest centre for each point, in chunks to bound memory."""
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    c2 = (centers * centers).sum(1)
    for i in range(0, points.shape[0], chunk):
        p = points[i : i + chunk]
        out[i : i + chunk] = (c2[None, :] - 2 * p @ centers.T).argmin(1)  # |p|^2 is constant per row
    return out


def _kmeans_pp(points: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a subsample (fast enough for 512 colours on a CPU)."""
    sub = points[torch.randperm(points.shape[0], generator=g)[: max(20 * k, 10_000)]]
    centers = sub[torch.randint(sub.shape[0], (1,), generator=g)]
    dist = ((sub - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        if float(dist.sum()) == 0:  # fewer distinct colours than k: repeat one, clusters stay empty
            nxt = sub[torch.randint(sub.shape[0], (1,), generator=g)]
        else:
            nxt = sub[torch.multinomial(dist, 1, generator=g)]
        centers = torch.cat([centers, nxt])
        dist = torch.minimum(dist, ((sub - nxt) ** 2).sum(1))
    return centers


def _image_shape(tokens: torch.Tensor, channels: int, height, width) -> tuple[int, int]:
    """(height, width) of the images behind (B, N) tokens: as given, else square."""
    pixels = tokens.shape[1] // channels
    if height is None and width is None:
        side = int(round(pixels**0.5))
        if side * side * channels != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens are not a square image; pass height and width")
        return side, side
    height = height or pixels // width
    width = width or pixels // height
    if height * width * channels != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens do not make {height}x{width} images of {channels} tokens a pixel")
    return height, width


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")


TOKENIZERS = {"subpixel": SubpixelTokenizer, "palette": PaletteTokenizer}


def build_tokenizer(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    for training_only in ("path", "fit_images"):  # how to obtain a palette, not what it is
        cfg.pop(training_only, None)
    return TOKENIZERS[name](**cfg)
