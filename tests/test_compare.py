"""scripts/compare.py's reading of runs: the same step and the same second, from local records only."""

import csv
import json

from imagegen.compare import head_to_head, summarize


def write_run(path, label, seconds_per_step, values, **info):
    """A run dir whose validations at steps 100, 200, ... gave `values`, at `seconds_per_step`."""
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"model": label, "metric": "val/bits_per_dim", "params": 1000,
                                               **info}))
    keys = ["step", "perf/tokens_seen", "perf/wall_clock_s", "val/bits_per_dim"]
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for i, value in enumerate(values, start=1):
            step = 100 * i
            writer.writerow({"step": step, "perf/tokens_seen": 64 * step,
                             "perf/wall_clock_s": seconds_per_step * step, "val/bits_per_dim": value})


def test_head_to_head_tells_per_step_from_per_second(tmp_path):
    # "slow" learns more per step but takes 3x as long a step: ahead per step, behind per second
    write_run(tmp_path / "slow", "slow", 3.0, [2.0, 1.5, 1.2])
    write_run(tmp_path / "fast", "fast", 1.0, [2.2, 1.8, 1.6, 1.4, 1.3, 1.1, 1.0, 0.9, 0.8])
    table = head_to_head([summarize(str(tmp_path / name)) for name in ("slow", "fast")])
    assert "at step 300" in table and "at 900 s" in table  # the shorter run's last validation on each axis
    assert "| fast | 1.6000 | 0.8000 |" in table and "| slow | 1.2000 | 1.2000 |" in table
    assert "per step: slow is lowest" in table and "per second: fast is lowest" in table


def test_head_to_head_says_when_the_runs_share_no_second(tmp_path):
    # "fast" ends (300 s) before "slow" validates for the first time (1000 s): nothing to compare per second
    write_run(tmp_path / "slow", "slow", 10.0, [2.0, 1.5])
    write_run(tmp_path / "fast", "fast", 1.0, [2.2, 1.8, 1.6])
    table = head_to_head([summarize(str(tmp_path / name)) for name in ("slow", "fast")])
    assert "per step: slow is lowest" in table
    assert "per second: no common point: slow had no validation yet at 300 s" in table


def test_runs_of_one_model_are_told_apart_by_their_settings(tmp_path):
    write_run(tmp_path / "a", "sparse", 1.0, [2.0], compile_mode="default", residual_dtype="float32")
    write_run(tmp_path / "b", "sparse", 1.0, [2.0], compile_mode="reduce-overhead", residual_dtype="autocast")
    write_run(tmp_path / "c", "sparse", 1.0, [2.0], compile_mode="off", residual_dtype="float32")
    labels = [summarize(str(tmp_path / name))["label"] for name in "abc"]
    assert labels == ["sparse", "sparse, autocast residual, reduce-overhead", "sparse"]


def test_plot_draws_the_training_loss_beside_the_validations(tmp_path):
    """The training loss, logged every few steps, is read with its tokens and seconds and drawn in the plot's
    second row (a run with one validation still shows its course); a run without it plots too."""
    from imagegen.compare import plot

    run_dir = tmp_path / "a"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"model": "sparse", "metric": "val/bits_per_dim"}))
    keys = ["step", "perf/tokens_seen", "perf/wall_clock_s", "train/loss", "val/bits_per_dim"]
    with open(run_dir / "metrics.csv", "w", newline="") as f:  # the logger's rows: losses, then a validation
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for step, loss in ((25, 5.0), (50, 4.0), (75, 3.5)):
            writer.writerow({"step": step, "perf/tokens_seen": 64 * step, "perf/wall_clock_s": step,
                             "train/loss": loss})
        writer.writerow({"step": 75, "val/bits_per_dim": 2.0})
    run = summarize(str(run_dir))
    assert [(p["step"], p["tokens"], p["seconds"], p["value"]) for p in run["train_curve"]] == [
        (25, 1600, 25, 5.0), (50, 3200, 50, 4.0), (75, 4800, 75, 3.5)]
    assert [(p["tokens"], p["value"]) for p in run["curve"]] == [(4800, 2.0)]
    write_run(tmp_path / "b", "dense", 1.0, [2.5])  # no training loss logged
    plot([run, summarize(str(tmp_path / "b"))], str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
