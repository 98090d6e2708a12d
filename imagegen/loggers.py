"""Experiment loggers: wandb that works with no network and no account, and its helpers."""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes.

    Reads files only: no network, no prompt, and no wandb.login() (whose failed lookup would make a
    later offline wandb.init ask for a key as well).
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(save_dir: str, project: str = "imagegen", mode: str = "auto", name: str | None = None,
                 group: str | None = None, tags: list | None = None, entity: str | None = None):
    """A Lightning WandbLogger. mode: auto (online when logged in, else offline), online, offline.

    WANDB_MODE in the environment wins over `mode`, as wandb users expect.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    mode = os.environ.get("WANDB_MODE") or mode
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=mode != "online", name=name, group=group,
                       tags=[str(t) for t in (tags or [])], entity=entity, log_model=False)


def finish_wandb(logger) -> str | None:
    """Close the run (so the next job of a sweep starts a clean one); return a sync hint if offline."""
    import wandb

    if wandb.run is None:
        return None
    run_dir = os.path.dirname(wandb.run.dir)  # .../wandb/offline-run-*/files -> .../offline-run-*
    offline = wandb.run.settings.mode == "offline" or getattr(wandb.run, "offline", False)
    wandb.finish()
    if getattr(logger, "_experiment", None) is not None:
        logger._experiment = None
    return f"wandb: this run was logged offline; upload it with:  wandb sync {run_dir}" if offline else None
