"""Image data: LightningDataModules that yield uint8 batches (B, H, W, 3) with fixed train/val/test splits.

    synthetic   the embedded default: procedural images, deterministic by index, no download
    cifar10     torchvision's CIFAR-10 (downloads where a network exists); 5,000 training images held out
    imagenet64  the official downsampled ImageNet .npz files (train_data_batch_*.npz, val_data.npz)
    folder      any tree of images: resized + centre-cropped, RGBA on white, grey to RGB, corrupt files
                skipped with a warning naming them

Tokenization happens on the model's device (imagegen.lit), so the palette travels with the checkpoint.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class SkippedImageWarning(UserWarning):
    """An image file could not be read and was left out of the data."""


# ----------------------------------------------------------------------------------------------- datasets


class SyntheticImages(Dataset):
    """Procedural images, the same for the same (seed, index): gradients, shapes and stripes, with
    long-range structure (mirror symmetry, repeated halves, full-height stripes) that only attention
    across rows and columns can exploit."""

    def __init__(self, start: int, length: int, image_size: int, seed: int = 0):
        self.start, self.length, self.size, self.seed = start, length, image_size, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return synthetic_image(self.start + i, self.size, self.seed)


def synthetic_image(index: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    palette = torch.tensor([0.0, 85.0, 170.0, 255.0])
    colour = lambda: palette[torch.randint(4, (3,), generator=g)]  # noqa: E731  64 base colours
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    angle = float(rand(1)) * 2 * math.pi
    t = (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5) + 0.71) / 1.42  # in [0, 1]
    img = colour() * (1 - t[..., None]) + colour() * t[..., None]  # (S, S, 3) gradient background
    for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
        cy, cx, r = float(rand(1)), float(rand(1)), 0.08 + 0.2 * float(rand(1))
        if rand(1) < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            inside = ((yy - cy).abs() < r) & ((xx - cx).abs() < r * (0.5 + float(rand(1))))
        img[inside] = colour()
    if rand(1) < 0.5:  # full-height stripes: the same column structure in every row
        period = int(torch.randint(4, 12, (1,), generator=g))
        cols = (torch.arange(size) % period) == 0
        img[:, cols] = colour()
    if rand(1) < 0.5:  # mirror the left half onto the right half
        img[:, size - size // 2 :] = img[:, : size // 2].flip(1)
    if rand(1) < 0.5:  # repeat the top half below: pixel (r + S/2, c) equals pixel (r, c)
        img[size - size // 2 :] = img[: size // 2]
    return img.round().clamp(0, 255).to(torch.uint8)  # (S, S, 3)


class ArrayImages(Dataset):
    """uint8 images (n, h, w, 3) held in memory (a numpy array or tensor), resized on the fly if needed."""

    def __init__(self, images, indices, image_size: int):
        self.images, self.indices, self.size = images, indices, image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img = torch.as_tensor(self.images[int(self.indices[i])])
        return resize_tensor(img, self.size)


class FileImages(Dataset):
    def __init__(self, files: list[str], image_size: int):
        self.files, self.size = files, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i], self.size)


def resize_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (h, w, 3) -> (size, size, 3): shorter side to `size` (antialiased), centre crop."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = img.permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def load_image(path: str, size: int) -> torch.Tensor:
    """Any image file -> uint8 (size, size, 3): transparency composited on white, grey to RGB."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = im.convert("RGB")
    return resize_tensor(pil_to_tensor(rgb).permute(1, 2, 0), size)  # (H, W, 3)


def readable_images(root: str) -> list[str]:
    """All image files under `root` (recursive, sorted) that decode; the others are warned about."""
    from PIL import Image

    files = sorted(
        p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p)
    )
    good = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
            good.append(p)
        except Exception as e:  # PIL raises many types for damaged files
            warnings.warn(f"skipping unreadable image {p}: {e}", SkippedImageWarning, stacklevel=2)
    return good


def split_indices(n: int, val: int, test: int, seed: int):
    """A fixed permutation of range(n) cut into (train, val, test) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val + test :], perm[:val], perm[val : val + test]


# ------------------------------------------------------------------------------------------ data modules


class ImageDataModule(L.LightningDataModule):
    """Shared loaders; subclasses implement `build_splits() -> (train, val, test)` datasets."""

    def __init__(self, image_size: int = 64, batch_size: int = 16, num_workers: int = 2, seed: int = 0):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"data.image_size must be positive, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.image_size, self.batch_size, self.num_workers, self.seed = image_size, batch_size, num_workers, seed
        self.splits: dict[str, Dataset] | None = None

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks (paths exist) that run before any expensive work."""

    def setup(self, stage: str | None = None):
        if self.splits is None:
            train, val, test = self.build_splits()
            self.splits = {"train": train, "val": val, "test": test}
            log.info("data %s: %s", type(self).__name__, {k: len(v) for k, v in self.splits.items()})

    def dataset(self, split: str) -> Dataset:
        self.setup()
        if split == "all":
            return torch.utils.data.ConcatDataset(list(self.splits.values()))
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose from train, val, test, all")
        return self.splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle and len(ds) >= self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def sample_pixels(self, num_images: int = 1000) -> torch.Tensor:
        """uint8 (P, 3) pixels of up to `num_images` training images (fixed choice), to fit a palette."""
        ds = self.dataset("train")
        if len(ds) == 0:
            raise ValueError("the training split is empty: nothing to fit a palette on")
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))[:num_images]
        return torch.stack([ds[int(i)] for i in pick]).reshape(-1, 3)


class SyntheticDataModule(ImageDataModule):
    def __init__(self, num_train: int = 50_000, num_val: int = 1_000, num_test: int = 1_000, **kw):
        super().__init__(**kw)
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise ValueError(f"data.{name} must be positive, got {n}")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test

    def build_splits(self):
        s, n1, n2 = self.image_size, self.num_train, self.num_val
        return (SyntheticImages(0, n1, s, self.seed), SyntheticImages(n1, n2, s, self.seed),
                SyntheticImages(n1 + n2, self.num_test, s, self.seed))


class FolderDataModule(ImageDataModule):
    def __init__(self, path: str, val_fraction: float = 0.05, test_fraction: float = 0.05, **kw):
        super().__init__(**kw)
        self.path, self.val_fraction, self.test_fraction = path, val_fraction, test_fraction

    def check(self):
        if not self.path or not os.path.isdir(self.path):
            raise FileNotFoundError(f"data.path {self.path!r} is not a directory of images")

    def build_splits(self):
        self.check()
        files = readable_images(self.path)
        if not files:
            raise ValueError(f"no readable image under {self.path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        n = len(files)
        val = max(1, round(n * self.val_fraction)) if n >= 2 else 0
        test = max(1, round(n * self.test_fraction)) if n >= 3 else 0
        if n == 1:
            warnings.warn(f"only one image under {self.path!r}: it serves as training and validation data")
            return FileImages(files, self.image_size), FileImages(files, self.image_size), FileImages([], self.image_size)
        tr, va, te = split_indices(n, val, test, self.seed)
        pick = lambda idx: FileImages([files[int(i)] for i in idx], self.image_size)  # noqa: E731
        return pick(tr), pick(va), pick(te)


class CIFAR10DataModule(ImageDataModule):
    def __init__(self, path: str = "data/cifar10", download: bool = True, num_val: int = 5_000, **kw):
        kw.setdefault("image_size", 32)
        super().__init__(**kw)
        self.path, self.download, self.num_val = path, download, num_val

    def build_splits(self):
        from torchvision.datasets import CIFAR10

        try:
            train = CIFAR10(self.path, train=True, download=self.download)
            test = CIFAR10(self.path, train=False, download=self.download)
        except Exception as e:
            raise FileNotFoundError(
                f"CIFAR-10 is not under data.path={self.path!r} and could not be downloaded ({e}). "
                "Download it where a network exists, or point data.path at the extracted cifar-10-batches-py"
            ) from e
        tr, va, _ = split_indices(len(train.data), self.num_val, 0, self.seed)
        return (ArrayImages(train.data, tr, self.image_size), ArrayImages(train.data, va, self.image_size),
                ArrayImages(test.data, torch.arange(len(test.data)), self.image_size))


class ImageNet64DataModule(ImageDataModule):
    """Official downsampled ImageNet (64x64 by default; the 32x32 files work the same way)."""

    def __init__(self, path: str = "data/imagenet64", num_val: int = 10_000, max_train_files: int | None = None, **kw):
        super().__init__(**kw)
        self.path, self.num_val, self.max_train_files = path, num_val, max_train_files

    def check(self):
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"data.path {self.path!r} is not a directory (expected train_data_batch_*.npz)")
        if not self._train_files():
            raise FileNotFoundError(f"no train_data_batch_*.npz under {self.path!r}")

    def _train_files(self):
        files = sorted(glob.glob(os.path.join(self.path, "train_data_batch_*.npz")),
                       key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
        return files[: self.max_train_files] if self.max_train_files else files

    @staticmethod
    def _read(path):
        import numpy as np

        data = np.load(path)["data"]  # (n, 3*s*s), channel planes R, G, B
        side = int(round(math.sqrt(data.shape[1] // 3)))
        return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)  # (n, s, s, 3)

    def build_splits(self):
        import numpy as np

        self.check()
        train = np.concatenate([self._read(p) for p in self._train_files()])
        tr, va, _ = split_indices(len(train), min(self.num_val, len(train) // 10), 0, self.seed)
        val_file = os.path.join(self.path, "val_data.npz")
        test = self._read(val_file) if os.path.exists(val_file) else train[:0]
        return (ArrayImages(train, tr, self.image_size), ArrayImages(train, va, self.image_size),
                ArrayImages(test, torch.arange(len(test)), self.image_size))
