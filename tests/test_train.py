"""End to end on a CPU: a tiny run writes last.ckpt and metrics, resume continues, wandb offline works,
bad input fails early with a clear message."""

import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch

from imagegen.lit import ImageGPT
from imagegen.training import train

from conftest import REPO


def test_tiny_run_writes_checkpoint_and_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    metrics = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "val/loss", "val/bits_per_token", "perf/tokens_per_sec", "perf/peak_mem_gb"):
        assert name in header
    assert metrics["val/bits_per_token"] > 0
    assert (run / "patterns" / "masks.png").is_file() and (run / "patterns" / "receptive_field.png").is_file()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # validation metric and training loss


def test_palette_travels_with_the_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=dense")
    train(cfg)
    restored = ImageGPT.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert restored.tokenizer.is_fitted
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(restored.tokenizer.palette, ckpt["state_dict"]["tokenizer.palette"])
    assert restored.tokenizer.palette.unique(dim=0).shape[0] > 1
    assert all(k.startswith(("model.", "tokenizer.")) and "_orig_mod" not in k for k in ckpt["state_dict"])


def test_resume_continues_global_step_optimizer_and_schedule(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=3", run_dir=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3
    train(tiny_cfg("trainer.max_steps=6", f"ckpt_path={last}", run_dir=tmp_path / "second"))
    second = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 6
    assert second["lr_schedulers"][0]["last_epoch"] == 6  # the schedule continued, not restarted
    assert second["optimizer_states"][0]["state"][0]["step"].item() == 6  # so did AdamW's moments
    monitor = lambda ckpt: next(v for k, v in ckpt["callbacks"].items() if "ThroughputMonitor" in k)  # noqa: E731
    assert monitor(second)["tokens_seen"] == 2 * monitor(first)["tokens_seen"]  # tokens and time continue
    assert monitor(second)["wall_clock_s"] > monitor(first)["wall_clock_s"] > 0


def test_resume_into_the_same_run_dir_continues_its_metrics(tiny_cfg, tmp_path):
    """Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the history up to the
    checkpoint (rows a crashed run logged after it are dropped and logged again), and a new run in an old
    run dir moves the old record aside."""
    import csv

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=4", run_dir=run))
    metrics = run / "metrics.csv"
    before = list(csv.DictReader(metrics.open()))
    with metrics.open("a") as f:  # what a crash after the checkpoint leaves behind
        f.write(",".join("99" if k == "step" else "" for k in before[0]) + "\n")
    train(tiny_cfg("trainer.max_steps=8", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=run))
    after = list(csv.DictReader(metrics.open()))
    steps = [float(r["step"]) for r in after if r["train/loss"]]
    assert after[: len(before)] == before  # the first segment is kept as it was
    assert 99 not in [float(r["step"]) for r in after]
    assert min(steps) < 4 <= max(steps) and len(steps) == len(set(steps))  # both segments, once each
    train(tiny_cfg("trainer.max_steps=2", run_dir=run))  # a new run in the same dir
    moved = list(run.glob("metrics.*.csv"))
    assert len(moved) == 1 and list(csv.DictReader(moved[0].open())) == after
    assert max(float(r["step"]) for r in csv.DictReader(metrics.open())) < 2


class StopAtStep(L.Callback):
    """Raises in the middle of training, as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_a_crash_leaves_a_checkpoint_and_the_curves(tiny_cfg, tmp_path, monkeypatch):
    """Training stopped by an exception leaves checkpoints/on_exception.ckpt at the step it reached (resumable)
    and curves.png of what it logged (here before its first validation)."""
    from imagegen import training

    real_callbacks = training.build_callbacks
    monkeypatch.setattr(training, "build_callbacks", lambda cfg: real_callbacks(cfg) + [StopAtStep(2)])
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash at step 2"):
        train(tiny_cfg("trainer.max_steps=8", run_dir=run))
    saved = torch.load(run / "checkpoints" / "on_exception.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(training, "build_callbacks", real_callbacks)
    train(tiny_cfg("trainer.max_steps=5", f"ckpt_path={run / 'checkpoints' / 'on_exception.ckpt'}", run_dir=run))
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5


def test_resumed_run_logs_its_throughput(tiny_cfg, tmp_path):
    """perf/* are logged with Lightning's step metrics in a resumed segment too: after a resume Lightning's count
    of steps is one ahead of global_step, and a test on global_step logged them on steps whose metrics it drops."""
    import csv

    run = tmp_path / "run"
    steps = ["trainer.log_every_n_steps=3", "trainer.val_check_interval=6"]
    train(tiny_cfg("trainer.max_steps=6", *steps, run_dir=run))
    train(tiny_cfg("trainer.max_steps=13", *steps, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=run))
    logged = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["train/loss"]]  # the step-metric rows
    assert {float(r["step"]) >= 6 for r in logged} == {False, True}  # both segments
    assert all(r["perf/tokens_per_sec"] and r["perf/tokens_seen"] for r in logged), logged  # none dropped
    seen = [float(r["perf/tokens_seen"]) for r in logged]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_subpixel_run_reports_bits_per_dim(tiny_cfg):
    metrics = train(tiny_cfg("tokenizer=subpixel", "data.image_size=4", "model.layout=[column,local,local,local]"))
    assert "val/bits_per_dim" in metrics and "val/bits_per_token" not in metrics


def test_wandb_offline_run(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_cfg("logger=wandb", "logger.mode=offline"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out


def test_resume_continues_the_wandb_run(tiny_cfg, tmp_path, monkeypatch):
    """The checkpoint holds the wandb run's id and run dir; resuming from it in that run dir logs into the same
    run (a second offline segment with that id, which `wandb sync` joins), unless logger.continue_run=false; a
    run dir of its own (another run started from the checkpoint) gets a new run."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(tiny_cfg("logger=wandb", "logger.mode=offline", "trainer.max_steps=2", run_dir=run))
    last = run / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, map_location="cpu", weights_only=False)["imagegen"]["wandb_run_id"]

    def run_ids(wandb_dir):  # offline-run-<date>_<time>-<id>, "-1" added when a second one starts that second
        return [re.fullmatch(r"offline-run-\d+_\d+-([a-z0-9]+)(-\d+)?", d.name).group(1)
                for d in sorted(wandb_dir.glob("offline-run-*"))]

    assert run_ids(run / "wandb") == [run_id]
    train(tiny_cfg("logger=wandb", "logger.mode=offline", "trainer.max_steps=4", f"ckpt_path={last}", run_dir=run))
    assert run_ids(run / "wandb") == [run_id, run_id]
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4 and resumed["imagegen"]["wandb_run_id"] == run_id
    train(tiny_cfg("logger=wandb", "logger.mode=offline", "trainer.max_steps=6", f"ckpt_path={last}",
                   run_dir=tmp_path / "branch"))
    (branch,) = run_ids(tmp_path / "branch" / "wandb")
    assert branch != run_id
    train(tiny_cfg("logger=wandb", "logger.mode=offline", "logger.continue_run=false", "trainer.max_steps=6",
                   f"ckpt_path={last}", run_dir=run))
    ids = run_ids(run / "wandb")
    assert len(ids) == 3 and ids.count(run_id) == 2  # (names of one second sort by id, not by start)


# ------------------------------------------------------------------------------------ errors, early


def test_unknown_data_path(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        train(tiny_cfg("data=folder", f"data.path={tmp_path}/nowhere"))


@pytest.mark.parametrize("override,message", [
    ("data.image_size=0", "image_size must be positive"),
    ("data.batch_size=0", "batch_size must be positive"),
    ("model.n_layer=0", "n_layer must be a positive integer"),
    ("model.n_embd=-32", "n_embd must be a positive integer"),
    ("model.n_head=3", "not divisible by n_head"),
    ("model.layout=[local,diagonal]", "unknown attention pattern 'diagonal'"),
    ("model.backend=axial", "cannot run pattern 'local'"),
])
def test_bad_sizes_and_patterns(tiny_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_cfg(override))


def test_checkpoint_of_another_grid_or_tokenizer_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=1", run_dir=tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"model.height: checkpoint 8, this run 12"):
        train(tiny_cfg("data.image_size=12", f"ckpt_path={last}", run_dir=tmp_path / "b"))
    with pytest.raises(ValueError, match=r"tokenizer.name: checkpoint 'palette', this run 'subpixel'"):
        train(tiny_cfg("tokenizer=subpixel", f"ckpt_path={last}", run_dir=tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_cfg(f"ckpt_path={tmp_path}/missing.ckpt", run_dir=tmp_path / "d"))
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before any work


# ------------------------------------------------------------------------------------ command line


def run_script(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_sweep_runs_each_job_cleanly_and_compares(tmp_path):
    """-m model=dense,sparse with wandb offline: two clean jobs, each its own wandb run in one group, the
    same metric names; compare.py on the sweep prints the table and writes the PNG."""
    from conftest import TINY

    overrides = [o for o in TINY if not o.startswith("+") and o != "logger=csv"]
    overrides += ["logger=wandb", "trainer.max_steps=4", "experiment_name=sweep_test"]
    done = run_script(["-m", "model=dense,sparse", *overrides, f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_dense-tiny-palette", "1_sparse-tiny-palette"]
    columns = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # each job its own run, none written into the other job's
        with open(job / "metrics.csv") as f:
            columns.append(set(f.readline().strip().split(",")))
        assert json.loads((job / "run.json").read_text())["model"] in job.name
    assert columns[0] == columns[1]
    assert {"train/loss", "val/loss", "val/bits_per_token", "perf/tokens_seen", "perf/wall_clock_s"} <= columns[0]
    assert done.stdout.count("wandb sync") == 2
    png = tmp_path / "compare.png"
    cmp = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(tmp_path / "sweep"), "--out",
                          str(png)], capture_output=True, text=True, timeout=120, check=False)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    summary, same_budget = cmp.stdout.split("\n\n", 1)  # the runs' table, then both read at one step/second
    table = [line for line in summary.splitlines() if line.startswith(("| dense", "| sparse"))]
    assert len(table) == 2 and all("val/bits_per_token" in line for line in table)
    assert "- per step: " in same_budget and "is lowest" in same_budget.split("- per step: ")[1].splitlines()[0]
    # per second: a 4-step run can end before the other's first validation (the first job of the sweep
    # also pays one-time start-up), and then compare.py says so instead of comparing
    assert "- per second: " in same_budget
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_fit_palette_script_output_is_used_by_training(tiny_cfg, tmp_path):
    out = tmp_path / "palette.pt"
    env = {**os.environ}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "fit_palette.py"), f"out={out}",
                           "data.image_size=8", "data.num_train=32", "data.num_workers=0", "tokenizer.num_colors=16",
                           "tokenizer.fit_images=8"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob("*.log")), "fit_palette.py left a log file in the working directory"
    palette = torch.load(out, weights_only=True)["palette"]
    train(tiny_cfg(f"tokenizer.path={out}", "trainer.max_steps=1"))
    restored = ImageGPT.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert torch.equal(restored.tokenizer.palette, palette)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_writes_one_run(tmp_path):
    """trainer=ddp with 2 CPU processes (gloo): Lightning relaunches the script for rank 1 into rank 0's
    run dir, so there is one run dir, one wandb run, one metrics.csv; tokens count both ranks."""
    from conftest import TINY

    overrides = [o for o in TINY if not o.startswith("+") and o not in ("trainer=cpu", "logger=csv")]
    overrides += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                  "logger=wandb", "trainer.max_steps=4"]
    done = run_script(overrides, tmp_path)  # the default, time-stamped run dir under outputs/
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    info = json.loads((run / "run.json").read_text())
    assert info["devices"] == 2 and info["tokens_per_step"] == 2 * 4 * 64
    with open(run / "metrics.csv") as f:
        header = f.readline().strip().split(",")
        rows = [dict(zip(header, line.strip().split(","))) for line in f]
    seen = max(float(r["perf/tokens_seen"]) for r in rows if r.get("perf/tokens_seen"))
    assert seen == 4 * 2 * 4 * 64  # 4 steps x 2 ranks x 4 images x 64 tokens
    assert "batch: 4 images per device x 2 device(s)" in done.stdout + done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_without_gpus_is_refused_before_any_work(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="trainer=fsdp needs GPUs"):
        train(tiny_cfg("trainer=fsdp", "trainer.accelerator=cpu"))
    assert not (tmp_path / "run" / "run.json").exists()


def test_external_launcher_needs_an_explicit_run_dir(tiny_cfg, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from imagegen.distributed import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    cfg = tiny_cfg()
    HydraConfig().set_config(cfg)
    with pytest.raises(ValueError, match="hydra.run.dir"):
        check_launch(cfg)
