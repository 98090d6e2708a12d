"""Train an ImageGPT-style model.

    python scripts/train.py                                   # sparse, small, synthetic 64x64, palette
    python scripts/train.py model=dense size=base data=folder data.path=DIR
    python scripts/train.py experiment=quick_cpu              # minutes on a CPU
    python scripts/train.py ckpt_path=outputs/.../checkpoints/last.ckpt   # resume
    python scripts/train.py -m model=dense,sparse              # a sweep: one clean run per job

Outputs land in the run dir (hydra.run.dir=DIR): checkpoints/, metrics, wandb files.
"""

import hydra
from omegaconf import DictConfig

from imagegen.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
