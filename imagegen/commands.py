"""What scripts/sample.py and scripts/evaluate.py do, given their composed configs."""

from __future__ import annotations

import json
import math
import os

import torch
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

import imagegen
from imagegen.data import load_image, readable_images
from imagegen.training import build


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def to_chw_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255  # uint8 (B, H, W, 3) -> (B, 3, H, W) in [0, 1]


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(to_chw_float(images), nrow=nrow, padding=2, pad_value=1.0), path)


def sample(cfg: DictConfig) -> str:
    """Sample a grid (and one PNG per image in a folder beside it); with prompt=DIR complete images."""
    dtype = cfg.get("dtype", "auto")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    pipe = imagegen.load(cfg.ckpt_path, device=pick_device(cfg.device))
    H = pipe.grid.height
    prompt = None
    if cfg.prompt:
        files = readable_images(cfg.prompt)
        if not files:
            raise ValueError(f"no readable image under prompt={cfg.prompt!r}")
        prompt = torch.stack([load_image(files[i % len(files)], H) for i in range(cfg.num_samples)])
    elif cfg.prompt_rows:
        raise ValueError("prompt_rows needs prompt=DIR (a folder of images to complete)")
    images = pipe.sample(cfg.num_samples, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                         prompt=prompt, prompt_rows=cfg.prompt_rows, batch_size=cfg.batch_size, progress=True,
                         dtype=dtype)
    folder = os.path.splitext(cfg.out)[0]
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        save_image(to_chw_float(img[None]), os.path.join(folder, f"{i:04d}.png"))
    if prompt is not None:  # each prompt beside its completion
        pairs = torch.stack([prompt, images], dim=1).flatten(0, 1)  # (2n, H, W, 3)
        save_grid(pairs, cfg.out, nrow=2 * max(1, int(math.sqrt(cfg.num_samples / 2))))
    else:
        save_grid(images, cfg.out, nrow=max(1, int(math.ceil(math.sqrt(cfg.num_samples)))))
    print(f"wrote {cfg.out} and {len(images)} images in {folder}/")
    return cfg.out


def heat_map(values: torch.Tensor, path: str, scale: int = 4) -> None:
    """(H, W) values as a black-red-yellow PNG, min to max."""
    v = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
    rgb = torch.stack([(v * 2).clamp(0, 1), (v * 2 - 1).clamp(0, 1), torch.zeros_like(v)])  # (3, H, W)
    rgb = torch.nn.functional.interpolate(rgb[None], scale_factor=scale, mode="nearest")[0]
    save_image(rgb, path)


@torch.no_grad()
def evaluate(cfg: DictConfig) -> dict:
    """NLL of a checkpoint on a data split: bits/dim or bits/token with a 95% interval, and a heat map."""
    pipe = imagegen.load(cfg.ckpt_path, device=pick_device(cfg.device))
    g = pipe.grid
    with open_dict(cfg):
        cfg.data.image_size = g.height  # the model's grid decides the image size
    datamodule = build(cfg.data)  # a bad data value raises its own clear error
    datamodule.check()
    dataset = datamodule.dataset(cfg.split)
    if len(dataset) == 0:
        raise ValueError(f"split {cfg.split!r} of {cfg.data._target_} is empty")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=datamodule.num_workers)
    from tqdm.auto import tqdm

    per_image, per_token_sum = [], torch.zeros(g.num_tokens, dtype=torch.float64)
    for images in tqdm(loader, desc=f"evaluating {cfg.split}", unit="batch"):
        nll = pipe.token_nll(images).double().cpu()  # (B, N) nats
        per_token_sum += nll.sum(0)
        per_image.append(nll.sum(1))
    per_image = torch.cat(per_image) / (g.num_tokens * math.log(2))  # bits per token/dim of each image
    n = per_image.numel()
    mean = per_image.mean().item()
    half = 1.96 * per_image.std().item() / math.sqrt(n) if n > 1 else float("nan")
    name = pipe.tokenizer.metric
    stem = os.path.splitext(cfg.out)[0]
    heat = (per_token_sum / n).view(g.height, g.width, g.channels).mean(-1) / math.log(2)  # (H, W) bits
    heat_map(heat.float(), stem + "_nll.png")
    result = {name: mean, f"{name}_ci95": [mean - half, mean + half], "num_images": n, "split": cfg.split,
              "ckpt_path": cfg.ckpt_path, "heat_map": stem + "_nll.png"}
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{name} = {mean:.4f} ± {half:.4f} (95%) on {n} images of split {cfg.split}; wrote {cfg.out}")
    return result
