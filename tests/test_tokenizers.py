"""Tokenizer round trips: subpixel exact, palette = nearest centroid, deterministic fitting."""

import pytest
import torch

from imagegen.tokenizers import PaletteTokenizer, SubpixelTokenizer, build_tokenizer


def random_images(n=3, h=5, w=7, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_subpixel_round_trip_is_exact_and_raster_ordered():
    tok = SubpixelTokenizer()
    images = random_images()
    tokens = tok.encode(images)
    assert tokens.shape == (3, 5 * 7 * 3) and tokens.dtype == torch.long
    r, c, ch = 2, 4, 1
    assert tokens[0, (r * 7 + c) * 3 + ch] == images[0, r, c, ch]  # t = (r*W + c)*C + ch
    assert torch.equal(tok.decode(tokens, 5, 7), images)


def test_palette_encodes_to_the_nearest_centroid():
    tok = PaletteTokenizer(num_colors=16, seed=3).fit(random_images(20, seed=1).reshape(-1, 3))
    images = random_images(seed=2)
    tokens = tok.encode(images)
    assert tokens.shape == (3, 35)
    pixels = images.reshape(-1, 3).float()
    dist = ((pixels[:, None, :] - tok.palette[None]) ** 2).sum(-1)  # brute force (P, K)
    chosen = dist.gather(1, tokens.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, dist.min(1).values)
    decoded = tok.decode(tokens, 5, 7)
    assert torch.equal(decoded.reshape(-1, 3), tok.palette[tokens.reshape(-1)].round().to(torch.uint8))


def test_palette_is_exact_when_the_data_has_few_colours():
    colours = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]], dtype=torch.uint8)
    images = colours[torch.randint(0, 4, (4, 6, 6))]  # (4, 6, 6, 3)
    tok = PaletteTokenizer(num_colors=8).fit(images.reshape(-1, 3))
    assert torch.equal(tok.decode(tok.encode(images), 6, 6), images)


def test_palette_fit_is_deterministic_for_a_seed():
    pixels = random_images(10, seed=5).reshape(-1, 3)
    a = PaletteTokenizer(num_colors=32, seed=7).fit(pixels).palette
    b = PaletteTokenizer(num_colors=32, seed=7).fit(pixels).palette
    assert torch.equal(a, b)


def test_palette_state_dict_round_trip():
    tok = PaletteTokenizer(num_colors=8).fit(random_images().reshape(-1, 3))
    fresh = PaletteTokenizer(num_colors=8)
    assert not fresh.is_fitted
    fresh.load_state_dict(tok.state_dict())
    assert fresh.is_fitted and torch.equal(fresh.palette, tok.palette)


def test_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        PaletteTokenizer(num_colors=8).encode(random_images())
    with pytest.raises(ValueError, match="uint8 images"):
        SubpixelTokenizer().encode(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer({"name": "jpeg"})
    with pytest.raises(ValueError, match="at least 2"):
        PaletteTokenizer(num_colors=0)
