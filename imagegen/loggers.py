"""Experiment loggers: wandb that works with no network and no account, its helpers, and the run's
own metrics.csv, which survives a resume."""

from __future__ import annotations

import csv
import netrc
import os
import time
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
                 group: str | None = None, tags: list | None = None, entity: str | None = None,
                 continue_run: bool = True, run_id: str | None = None):
    """A Lightning WandbLogger. mode: auto (online when logged in, else offline), online, offline.

    WANDB_MODE in the environment wins over `mode`, as wandb users expect. `run_id`: the wandb run to continue
    (a resumed training run passes its checkpoint's, unless continue_run is false).
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    mode = os.environ.get("WANDB_MODE") or mode
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=mode != "online", name=name, group=group,
                       tags=[str(t) for t in (tags or [])], entity=entity, log_model=False,
                       id=run_id if continue_run else None)


def wandb_run_id(loggers) -> str | None:
    """The id of the wandb run among `loggers`, for the checkpoint (so that resuming continues the run); None
    without wandb, and on ranks other than 0 (their logger holds a stand-in, not a run)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            run_id = getattr(logger.experiment, "id", None)
            return run_id if isinstance(run_id, str) else None
    return None


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


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a metrics.csv already in the run dir is not deleted (see RunCSVLogger)."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__, where Lightning's deletes the file
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self.resume_step is None:  # a new run in an old run dir: keep the old record beside it
            os.replace(path, path[: -len(".csv")] + time.strftime(".%Y%m%d-%H%M%S.csv"))
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) < self.resume_step]
        with open(path, "w", newline="") as f:  # the rows logged after the checkpoint are logged again
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # save() appends under this header (and rewrites it for new keys)


class RunCSVLogger(CSVLogger):
    """`<run dir>/metrics.csv` (and hparams.yaml), as Lightning's CSVLogger writes them, except that a
    metrics.csv already there is kept: resuming into the same run dir (`ckpt_path=RUN/checkpoints/last.ckpt
    hydra.run.dir=RUN`, as after a crash or a preempted SLURM job) continues it from the checkpoint's step,
    and a new run started in an old run dir first moves the old file aside as `metrics.<time>.csv`.
    Lightning's own logger deletes it."""

    def __init__(self, save_dir: str, resume_step: int | None = None, **kwargs):
        super().__init__(save_dir=save_dir, name="", version="", **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume_step)
        return self._experiment
