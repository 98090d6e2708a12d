"""Several GPUs: the FSDP strategy for our blocks, and the checks that keep one run dir per run.

Launches (DESIGN.md section 9: Hydra + multi-GPU traps):
    python scripts/train.py trainer=ddp trainer.devices=2           # one node: Lightning starts the ranks
    torchrun --nproc_per_node=8 scripts/train.py trainer=ddp hydra.run.dir=outputs/run1
    srun python scripts/train.py trainer=ddp trainer.num_nodes=2 hydra.run.dir=outputs/run1   # SLURM
Lightning's own launcher passes rank 0's run dir to the other ranks. Under torchrun or srun every rank
runs Hydra itself, so each would make its own time-stamped run dir: `hydra.run.dir` must be given.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig


def launched_externally() -> bool:
    """True when torchrun or srun started this process as one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def run_dir_given() -> bool:
    """True when the command line set hydra.run.dir (or this is not a Hydra app run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)


def check_launch(cfg: DictConfig) -> None:
    """Refuse, before any work, a launch that cannot run as configured."""
    from imagegen.training import uses_gpu

    if launched_externally() and not run_dir_given():
        raise ValueError("started by torchrun/srun: every rank runs Hydra, so pass hydra.run.dir=DIR "
                         "to give all ranks one run dir (e.g. hydra.run.dir=outputs/my_run)")
    if "fsdp" in str(cfg.trainer.get("strategy", "")).lower() and not uses_gpu(cfg):
        raise ValueError("trainer=fsdp needs GPUs (Lightning's FSDP has no CPU path); "
                         "on CPUs use trainer=ddp, which runs with the gloo backend")


def fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy, wrapping (and optionally checkpointing) each transformer block."""
    from lightning.pytorch.strategies import FSDPStrategy

    from imagegen.model import Block

    checkpointing = kwargs.pop("activation_checkpointing", False)
    if checkpointing:
        kwargs["activation_checkpointing_policy"] = {Block}
    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)
