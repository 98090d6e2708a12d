"""Evaluate a checkpoint: bits/dim (subpixel) or bits/token (palette) with a 95% interval, and a heat map.

    python scripts/evaluate.py ckpt_path=outputs/.../checkpoints/last.ckpt data=synthetic split=val out=metrics.json
    python scripts/evaluate.py ckpt_path=... data=folder data.path=DIR split=all
"""

import hydra
from omegaconf import DictConfig

from imagegen import commands


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    commands.evaluate(cfg)


if __name__ == "__main__":
    main()
