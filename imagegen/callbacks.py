"""Training callbacks: throughput and memory (`perf/*` metrics, the same names for every pattern), a checkpoint
when training stops on an error, pictures in the run dir (attention patterns, sample grids, loss curves) and
wandb's summaries."""

from __future__ import annotations

import os
import resource
import time
import warnings

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on `device`, or the process's peak RSS on a CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class ThroughputMonitor(L.Callback):
    """Logs, with Lightning's step metrics (every `trainer.log_every_n_steps` optimizer steps; `every_n_steps`
    where Lightning does not say): perf/tokens_per_sec (training steps only, validation
    excluded), perf/tokens_seen, perf/wall_clock_s (seconds of training since the first step, validation
    included, continued across resumes), perf/mfu (GPUs with a known bf16 peak; FLOPs as in
    imagegen.train_benchmark) and perf/peak_mem_gb (GiB). tokens_seen and wall_clock_s are logged with
    every validation as well, so validation metrics plot against tokens and time (wandb, compare.py)."""

    def __init__(self, every_n_steps: int = 25):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every = every_n_steps
        self.tokens_seen = 0
        self.wall_clock_before = 0.0  # seconds of earlier runs of this training (resume)
        self._fit_start = None
        self._start = None
        self._tokens = 0
        self._flops_per_token = None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def wall_clock(self) -> float:
        return self.wall_clock_before + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)

    def on_train_start(self, trainer, pl_module):
        from imagegen.train_benchmark import model_step_flops, peak_flops

        self._fit_start = time.perf_counter()
        peak = peak_flops() if pl_module.device.type == "cuda" else None
        if peak:
            self._flops_per_token = model_step_flops(pl_module.model) / peak

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch.shape[0] * pl_module.grid.num_tokens * trainer.world_size
        self._tokens += tokens
        self.tokens_seen += tokens
        if self._logs_this_step(trainer) and self._start is not None:
            self._sync(pl_module)
            elapsed = time.perf_counter() - self._start
            speed = self._tokens / elapsed
            pl_module.log("perf/tokens_per_sec", speed)
            if self._flops_per_token is not None:
                pl_module.log("perf/mfu", speed / trainer.world_size * self._flops_per_token)
            pl_module.log("perf/peak_mem_gb", peak_memory_gib(pl_module.device))
            self._log_progress(pl_module)
            self._start, self._tokens = time.perf_counter(), 0

    def _logs_this_step(self, trainer) -> bool:
        """Whether to log now: when Lightning writes this batch's step metrics to the loggers (it counts the
        optimizer steps this run has taken, not global_step, and after a resume the two differ by one, so a test
        on global_step logged on steps whose metrics Lightning dropped), else every `every` steps."""
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and hasattr(connector, "should_update_logs"):
            return bool(connector.should_update_logs)
        return trainer.global_step % self.every == 0

    def _log_progress(self, pl_module):
        pl_module.log("perf/tokens_seen", float(self.tokens_seen))
        pl_module.log("perf/wall_clock_s", self.wall_clock())

    def on_validation_start(self, trainer, pl_module):
        self._start, self._tokens = None, 0  # restart the throughput clock after validation

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self._fit_start is not None:
            self._log_progress(pl_module)  # beside val/*: the x-axes of the comparison plots

    def state_dict(self):
        return {"tokens_seen": self.tokens_seen, "wall_clock_s": self.wall_clock()}

    def load_state_dict(self, state_dict):
        self.tokens_seen = state_dict.get("tokens_seen", 0)
        self.wall_clock_before = state_dict.get("wall_clock_s", 0.0)


class WandbSummaries(L.Callback):
    """wandb only: run summaries that compare runs (best validation metric = its minimum, peak memory =
    its maximum) and the x-axes to plot against: trainer/global_step (the default), perf/tokens_seen and
    perf/wall_clock_s (pick them in a panel's X axis)."""

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            if type(logger).__name__ != "WandbLogger":
                continue
            run = logger.experiment
            for name in ("perf/tokens_seen", "perf/wall_clock_s"):
                run.define_metric(name, summary="max")
            for name in ("val/loss", f"val/{pl_module.metric}", "train/loss"):
                run.define_metric(name, summary="min")
            run.define_metric("perf/peak_mem_gb", summary="max")
            run.define_metric("perf/tokens_per_sec", summary="mean")


def log_images(trainer, key: str, images: list, **kwargs) -> None:
    """Give pictures to every logger that takes them (wandb); the files are written by the caller."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=images, **kwargs)


class CrashCheckpoint(L.Callback):
    """Saves `<dirpath>/on_exception.ckpt` when training raises (Ctrl-C included), so a crash loses nothing.

    Unlike Lightning's OnExceptionCheckpoint it does not make `fit(ckpt_path=None)` resume from "last".
    """

    def __init__(self, dirpath: str, filename: str = "on_exception"):
        self.path = os.path.join(dirpath, f"{filename}.ckpt")

    def on_exception(self, trainer, pl_module, exception):
        if trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                print(f"training stopped by {type(exception).__name__}; state saved to {self.path} "
                      f"(resume with ckpt_path={self.path})")


class CurvesPicture(L.Callback):
    """Draws `path`: the run's validation metric and training loss against tokens seen and wall-clock
    (imagegen.compare's plot of the run's own metrics.csv), after every validation, when training ends and
    when it stops on an error, so that a run has its curves to look at without wandb."""

    def __init__(self, path: str):
        self.path = path

    def _draw(self, trainer) -> None:
        from imagegen.compare import plot, summarize
        from imagegen.loggers import RunCSVLogger

        record = next((lg for lg in trainer.loggers if isinstance(lg, RunCSVLogger)), None)
        if record is None:  # logger=none: no metrics.csv to draw from
            return
        record.save()  # what is buffered, into metrics.csv
        if not os.path.isfile(os.path.join(record.log_dir, "metrics.csv")):
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        plot([summarize(record.log_dir)], self.path)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._draw(trainer)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        self._draw(trainer)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception):
        try:  # the run's own error is what must surface, not one of drawing
            self._draw(trainer)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not draw {self.path} after the error: {e}", stacklevel=1)


class PatternPictures(L.Callback):
    """At the start of training, draws the model's attention layout (masks on a small grid, and the
    receptive field of one pixel after 1-3 layers) into `<dirpath>/` and logs it to wandb."""

    def __init__(self, dirpath: str, grid: int = 12):
        self.dirpath, self.grid = dirpath, grid

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module):
        from imagegen.pictures import masks_picture, receptive_field_picture

        cfg = pl_module.model.cfg
        names = sorted({n for spec in cfg.layout for group in spec.split("|") for n in group.split("+")})
        os.makedirs(self.dirpath, exist_ok=True)
        pictures = {
            "masks": masks_picture(names, 6, 6, cfg.channels, **cfg.pattern_params),
            "receptive_field": receptive_field_picture({"this model": cfg.layout}, self.grid, self.grid, cfg.channels),
        }
        for name, image in pictures.items():
            image.save(os.path.join(self.dirpath, f"{name}.png"))
            log_images(trainer, f"patterns/{name}", [image])  # one key each: wandb wants one size per key


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps, samples `num_samples` images with the KV-cache sampler and
    saves them as `<dirpath>/step_XXXXXXX.png` (and logs them to wandb). every_n_steps=0 turns it off."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_samples: int = 16, temperature: float = 1.0,
                 seed: int = 0):
        if every_n_steps < 0 or num_samples < 1:
            raise ValueError("SampleGrid needs every_n_steps >= 0 and num_samples >= 1")
        self.dirpath, self.every, self.n, self.temperature, self.seed = dirpath, every_n_steps, num_samples, temperature, seed

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every or step % self.every:
            return
        if "FSDP" in type(trainer.strategy).__name__:  # sharded weights: rank 0 alone cannot sample
            return
        from imagegen.api import Pipeline
        from imagegen.commands import save_grid

        was_training = pl_module.model.training
        pipe = Pipeline(pl_module.model, pl_module.tokenizer)
        images = pipe.sample(self.n, self.temperature, seed=self.seed)  # from a bf16 copy on GPUs
        pl_module.model.train(was_training)
        pl_module.tokenizer.train(was_training)
        path = os.path.join(self.dirpath, f"step_{step:07d}.png")
        save_grid(images, path, nrow=max(1, int(self.n**0.5)))
        log_images(trainer, "samples", [path], step=step)
