"""imagegen.load, sample.py and evaluate.py on a checkpoint from a tiny CPU training run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.data import SyntheticDataModule
from imagegen.training import train

from conftest import REPO, TINY, compose_cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    overrides = [o for o in TINY if "sample_grid" not in o] + [
        "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=4"]
    train(compose_cfg(overrides, run))
    assert (run / "samples" / "step_0000002.png").is_file()  # the training callback sampled a grid
    return run / "checkpoints" / "last.ckpt"


def script(name, *args, cwd):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(Path(cwd).glob("*.log")), "the script left a log file in the working directory"
    return done.stdout


def test_load_contract(ckpt):
    pipe = imagegen.load(str(ckpt))
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    tokens = pipe.tokenizer.encode(images)
    assert tokens.shape == (3, 64)
    assert pipe.model(tokens).shape == (3, 64, 16)
    decoded = pipe.tokenizer.decode(tokens)  # DESIGN section 6: decode(tokens) -> uint8 (B, H, W, 3)
    assert decoded.shape == (3, 8, 8, 3) and decoded.dtype == torch.uint8
    assert torch.equal(pipe.tokenizer.encode(decoded), tokens)  # palette colours encode to themselves
    ll = pipe.log_likelihood(images)
    assert ll.shape == (3,) and torch.all(ll < 0)
    out = pipe.sample(5, temperature=0.9, top_k=8, seed=1, batch_size=2)
    assert out.shape == (5, 8, 8, 3) and out.dtype == torch.uint8
    assert torch.equal(out, pipe.sample(5, temperature=0.9, top_k=8, seed=1, batch_size=2))


def test_load_refuses_what_it_cannot_trust(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        imagegen.load(str(tmp_path / "missing.ckpt"))
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    blob["imagegen"]["format"] = 999
    torch.save(blob, tmp_path / "future.ckpt")
    with pytest.raises(ValueError, match="format 999"):
        imagegen.load(str(tmp_path / "future.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an imagegen checkpoint"):
        imagegen.load(str(tmp_path / "other.ckpt"))


def test_sample_script_grid_and_images(ckpt, tmp_path):
    script("sample", f"ckpt_path={ckpt}", "num_samples=9", f"out={tmp_path}/grid.png", "seed=3", cwd=tmp_path)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # 3x3 images of 8 px, 2 px padding
    assert len(list((tmp_path / "grid").glob("*.png"))) == 9


def test_completion_keeps_the_prompt_rows(ckpt, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    dm = SyntheticDataModule(image_size=8, num_train=4, num_val=1, num_test=1, num_workers=0, seed=5)
    dm.setup()
    for i in range(2):
        Image.fromarray(dm.dataset("train")[i].numpy()).save(prompts / f"p{i}.png")
    script("sample", f"ckpt_path={ckpt}", "num_samples=2", f"prompt={prompts}", "prompt_rows=3",
           f"out={tmp_path}/done.png", cwd=tmp_path)
    pipe = imagegen.load(str(ckpt))
    for i in range(2):
        prompt = torch.from_numpy(np.asarray(Image.open(prompts / f"p{i}.png").convert("RGB")))[None]
        kept = pipe.tokenizer.decode(pipe.tokenizer.encode(prompt), 8, 8)[0, :3]
        done = torch.from_numpy(np.asarray(Image.open(tmp_path / "done" / f"{i:04d}.png").convert("RGB")))
        assert torch.equal(done[:3], kept)
    with Image.open(tmp_path / "done.png") as grid:
        assert grid.size[0] == 2 * 8 + 3 * 2  # prompt beside its completion


def test_evaluate_equals_the_api(ckpt, tmp_path):
    out = tmp_path / "metrics.json"
    script("evaluate", f"ckpt_path={ckpt}", "split=val", f"out={out}", "data.num_train=64", "data.num_val=8",
           "data.num_workers=0", cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["num_images"] == 8 and (tmp_path / "metrics_nll.png").is_file()
    pipe = imagegen.load(str(ckpt))
    dm = SyntheticDataModule(image_size=8, num_train=64, num_val=8, num_test=8, num_workers=0)
    dm.setup()
    images = torch.stack([dm.dataset("val")[i] for i in range(8)])
    expected = (-pipe.log_likelihood(images).sum() / (8 * 64 * math.log(2))).item()
    assert result["bits_per_token"] == pytest.approx(expected, rel=1e-5)
    lo, hi = result["bits_per_token_ci95"]
    assert lo < result["bits_per_token"] < hi


def test_sampling_dtype_choice(ckpt):
    """auto keeps the fp32 model on a CPU; an explicit bf16 samples from a bf16 copy, the original untouched."""
    pipe = imagegen.load(str(ckpt))
    assert pipe.sampling_model("auto") is pipe.model
    images = pipe.sample(2, seed=0, dtype=torch.bfloat16)
    assert images.dtype == torch.uint8 and images.shape == (2, pipe.grid.height, pipe.grid.width, 3)
    assert next(pipe.model.parameters()).dtype == torch.float32
    assert next(pipe.sampling_model(torch.bfloat16).parameters()).dtype == torch.bfloat16
