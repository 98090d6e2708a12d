"""Pattern pictures: the receptive-field facts hold in what is drawn, and the script writes PNGs."""

import subprocess
import sys

import torch
from PIL import Image

from imagegen.pictures import reachable

from conftest import REPO


def test_receptive_field_drawn_is_the_true_one():
    H = W = 7
    q = (H - 2) * W + W // 2
    causal = torch.arange(H * W) <= q
    assert torch.equal(reachable(["local", "column"], 2, H, W, 1, q), causal)
    assert not torch.equal(reachable(["local", "column"], 1, H, W, 1, q), causal)
    axial = reachable(["row", "column"], 3, H, W, 1, q)
    assert (causal & ~axial).any() and not axial[(H - 3) * W + W - 1]  # upper right never reached


def test_visualize_patterns_script_writes_pngs(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "visualize_patterns.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("masks.png", "receptive_field.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100 and im.size[1] > 50
