"""Data modules on small generated files: synthetic, folder (corrupt, RGBA, grey), imagenet64, cifar10."""

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen.data import (
    CIFAR10DataModule, FolderDataModule, ImageNet64DataModule, SkippedImageWarning, SyntheticDataModule,
    load_image,
)


def test_synthetic_is_deterministic_by_index_and_split():
    a = SyntheticDataModule(image_size=16, num_train=10, num_val=3, num_test=2, num_workers=0)
    b = SyntheticDataModule(image_size=16, num_train=10, num_val=3, num_test=2, num_workers=0)
    a.setup(), b.setup()
    assert [len(a.dataset(s)) for s in ("train", "val", "test")] == [10, 3, 2]
    x = a.dataset("train")[4]
    assert x.shape == (16, 16, 3) and x.dtype == torch.uint8
    assert torch.equal(x, b.dataset("train")[4])
    assert not torch.equal(a.dataset("train")[0], a.dataset("train")[1])
    assert not torch.equal(a.dataset("val")[0], a.dataset("train")[0])  # disjoint indices
    a.batch_size = 4
    assert next(iter(a.train_dataloader())).shape == (4, 16, 16, 3)


def write_folder(root, with_corrupt=True):
    (root / "sub" / "deeper").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:6, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "rgba.png")
    Image.fromarray(np.full((9, 9), 77, dtype=np.uint8), "L").save(root / "sub" / "deeper" / "grey.jpg", quality=100)
    Image.fromarray(rgb[:10, :10]).save(root / "sub" / "small.bmp")
    if with_corrupt:
        (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image")


def test_folder_module_reads_everything_and_skips_corrupt_files(tmp_path):
    write_folder(tmp_path)
    dm = FolderDataModule(path=str(tmp_path), image_size=8, batch_size=2, num_workers=0)
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        dm.setup()
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 4 and sizes["val"] >= 1  # a small folder still validates
    for i in range(len(dm.dataset("all"))):
        img = dm.dataset("all")[i]
        assert img.shape == (8, 8, 3) and img.dtype == torch.uint8


def test_rgba_is_composited_on_white_and_grey_becomes_rgb(tmp_path):
    write_folder(tmp_path, with_corrupt=False)
    rgba = load_image(str(tmp_path / "sub" / "rgba.png"), 12)
    assert torch.equal(rgba[0, 0], torch.tensor([200, 0, 0], dtype=torch.uint8))
    assert torch.equal(rgba[-1, -1], torch.tensor([255, 255, 255], dtype=torch.uint8))
    grey = load_image(str(tmp_path / "sub" / "deeper" / "grey.jpg"), 4)
    assert grey.shape == (4, 4, 3) and torch.all(grey[..., 0] == grey[..., 1]) and torch.all(grey[..., 1] == grey[..., 2])
    wide = load_image(str(tmp_path / "rgb.png"), 16)  # 20x30 -> shorter side 16, centre crop
    assert wide.shape == (16, 16, 3)


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable image"):
        FolderDataModule(path=str(tmp_path / "empty"), num_workers=0).setup()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        FolderDataModule(path=str(tmp_path / "missing"), num_workers=0).check()


def test_imagenet64_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    planes = lambda n: rng.integers(0, 256, (n, 3 * 8 * 8), dtype=np.uint8)  # noqa: E731  (R, G, B planes)
    first = planes(30)
    np.savez(tmp_path / "train_data_batch_1.npz", data=first, labels=np.zeros(30))
    np.savez(tmp_path / "train_data_batch_2.npz", data=planes(20), labels=np.zeros(20))
    np.savez(tmp_path / "val_data.npz", data=planes(7), labels=np.zeros(7))
    dm = ImageNet64DataModule(path=str(tmp_path), image_size=8, num_val=5, num_workers=0)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [45, 5, 7]
    # the channel planes become HWC: pixel (r, c) channel k is data[k*64 + r*8 + c]
    images = dm.splits["train"].images  # all training files, (50, 8, 8, 3)
    assert images[0, 2, 3, 1] == first[0, 64 + 2 * 8 + 3]
    with pytest.raises(FileNotFoundError, match="train_data_batch"):
        ImageNet64DataModule(path=str(tmp_path / "sub"), num_workers=0).check()


def test_cifar10_splits_with_a_stand_in_dataset(monkeypatch):
    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = np.zeros((50 if train else 10, 32, 32, 3), dtype=np.uint8)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    dm = CIFAR10DataModule(path="unused", num_val=5, num_workers=0)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [45, 5, 10]
    assert dm.dataset("train")[0].shape == (32, 32, 3)


def test_cifar10_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not under"):
        CIFAR10DataModule(path=str(tmp_path), download=False, num_workers=0).setup()


@pytest.mark.parametrize("bad", [dict(image_size=0), dict(batch_size=-1), dict(num_train=0)])
def test_zero_or_negative_sizes_fail(bad):
    with pytest.raises(ValueError, match="must be positive"):
        SyntheticDataModule(**bad)
