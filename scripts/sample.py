"""Sample images from a checkpoint (a grid PNG and one PNG per image), or complete prompts.

    python scripts/sample.py ckpt_path=outputs/.../checkpoints/last.ckpt num_samples=16 out=samples.png
    python scripts/sample.py ckpt_path=... prompt=DIR prompt_rows=32 out=completions.png top_k=64
"""

import hydra
from omegaconf import DictConfig

from imagegen import commands


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    commands.sample(cfg)


if __name__ == "__main__":
    main()
