"""Fit a k-means colour palette ahead of training (training fits one itself when none is given).

    python scripts/fit_palette.py data=folder data.path=DIR out=palette.pt tokenizer.num_colors=512
    python scripts/train.py data=folder data.path=DIR tokenizer.path=palette.pt
"""

import hydra
from omegaconf import DictConfig

from imagegen.training import fit_palette


@hydra.main(version_base="1.3", config_path="../conf", config_name="fit_palette")
def main(cfg: DictConfig) -> None:
    fit_palette(cfg)


if __name__ == "__main__":
    main()
