"""scripts/benchmark.py runs end to end in --quick mode (no timing claims on a CPU)."""

import gzip
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def test_benchmark_quick_modes_run(tmp_path):
    for what in ("attention", "sample", "train"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), what, "--quick",
                               "--out", str(tmp_path / f"{what}.json")], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{what}.json").is_file() and "|" in done.stdout


def test_profile_splits_a_step_into_groups_that_add_up(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "profile", "--quick",
                           "--out", str(tmp_path / "profile.json"), "--trace", str(tmp_path / "trace.json.gz")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    with gzip.open(tmp_path / "trace.json.gz") as f:  # --trace: the profiled steps as a Chrome trace
        assert any(e.get("name") == "aten::mm" for e in json.load(f)["traceEvents"])
    result = json.loads((tmp_path / "profile.json").read_text())
    assert {"attention", "matmul"} <= set(result["groups"])  # a step runs both
    total = sum(k["ms_per_step"] for k in result["kernels"])
    assert abs(sum(result["groups"].values()) - total) < 1e-6 * max(total, 1)
    assert "| attention |" in done.stdout


def test_kernel_tuning_keeps_the_fastest_setting_per_key_and_restores_the_defaults(monkeypatch):
    """scripts/benchmark.py tune (GPU only) searches launch settings by coordinate descent; here with a fake
    timer whose fastest settings are known, and a setting that fails to launch."""
    from imagegen import band_attention, kernel_tuning, short_attention
    from imagegen.attention import Grid

    band_defaults, short_defaults = dict(band_attention.LAUNCH), dict(short_attention.LAUNCH)

    def fake_time(spec, grid, batch, backend):
        launch = band_attention.LAUNCH
        if launch["dkdv"][:2] == (128, 128):
            return "failed: OutOfResources"
        return float(sum(sum(v) for v in launch.values())
                     - 1000 * (launch["dq"] == (128, 64, 8, 3)) - 1000 * (launch["strip"] == (64, 16, 4, 1)))

    monkeypatch.setattr(kernel_tuning, "_timed", fake_time)
    found = kernel_tuning.tune_band(Grid(8, 100, 1), 2)  # rows of 100 tokens: a window wider than a tile
    assert found["best"] == {**band_defaults, "fwd": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dq": (128, 64, 8, 3)}
    assert found["tried"]["dkdv"][str((128, 128, 4, 2))].startswith("failed")
    assert set(found["tried"]) == {"fwd", "dkdv", "dq"}
    found = kernel_tuning.tune_band(Grid(8, 8, 1), 2)  # a window within one tile: the one-pass backward
    assert set(found["tried"]) == {"fwd", "strip"}
    assert found["best"]["strip"] == (64, 16, 4, 1)
    assert str((0, 0, 0, 0)) in found["tried"]["strip"]  # the two-kernel backward, timed beside it
    assert band_attention.LAUNCH == band_defaults and short_attention.LAUNCH == short_defaults


def quick_train_rows(tmp_path, *args: str) -> tuple[list[str], str]:
    """`benchmark.py train --quick --sizes 0 ARGS`: the rows' model names, and what it printed."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "train", "--quick", "--sizes", "0",
                           *args, "--out", str(tmp_path / "train.json")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [r["model"] for r in json.loads((tmp_path / "train.json").read_text())["train"]], done.stdout


def test_train_benchmark_times_each_residual_dtype(tmp_path):
    names, printed = quick_train_rows(tmp_path, "--residual-dtypes", "float32", "autocast")
    assert names == ["dense", "sparse", "dense, autocast residual", "sparse, autocast residual"]
    assert "| ours, sparse, autocast residual |" in printed


def test_train_rows_say_how_long_the_host_takes_to_issue_a_step(tmp_path):
    """Each row has the host's time to issue one step beside ms/step (on a CPU both are the step's wall time)."""
    quick_train_rows(tmp_path, "--models", "sparse")
    (row,) = json.loads((tmp_path / "train.json").read_text())["train"]
    assert 0 < row["host_ms_per_step"] < 60e3 and row["ms_per_step"] > 0


def test_train_rows_say_the_cards_clock_and_power_while_timed(tmp_path):
    """Each row records the SM clock, power and power-capped share sampled through NVML while it was timed
    (empty without a GPU driver), and the table shows them."""
    from imagegen.gpu_clock import summarize
    from imagegen.train_benchmark import format_train

    quick_train_rows(tmp_path, "--models", "sparse")
    result = json.loads((tmp_path / "train.json").read_text())
    (row,) = result["train"]
    assert "clocks" in row and (row["clocks"] == {} or row["clocks"]["samples"] > 0)
    # (MHz, W, clock-event reasons): 0x4 the software power cap, 0x8 hardware slowdown, 0x20 thermal
    row["clocks"] = summarize([(1980, 300.0, 0), (1650, 690.0, 0x4), (1400, 699.0, 0x4 | 0x20), (1600, 680.0, 0x8)])
    assert row["clocks"] == {"sm_mhz": 1625, "power_w": 685.0, "power_capped": 0.75, "thermal": 0.25, "samples": 4}
    assert "| 1625 MHz, 685 W (75%) |" in format_train(result)
    assert summarize([]) == {}


def test_profile_table_names_the_operators_behind_kernels():
    """On a GPU the profile also lists the ATen operators that launched kernels (e.g. what a reduction kernel
    outside Inductor's fusions belongs to); the table shows them with their calls per step."""
    from imagegen.train_benchmark import format_profile

    result = {"model": "sparse", "size": "s", "N": 16, "batch": 2, "device": "GPU", "torch": "2.x",
              "timed_ms_per_step": 2.0, "launches_per_step": 3, "groups": {"matmul": 1.0, "other": 0.5},
              "kernels": [{"name": "reduce_kernel", "group": "other", "ms_per_step": 0.5, "calls_per_step": 50}],
              "operators": [{"name": "aten::sum", "ms_per_step": 0.5, "calls_per_step": 50}]}
    text = format_profile(result)
    assert "| `aten::sum` | 0.500 | 50 |" in text
    del result["operators"]
    assert "ATen operators" not in format_profile(result) and "MHz" not in format_profile(result)
    result["clocks"] = {"sm_mhz": 1650, "power_w": 690.0, "power_capped": 0.95, "thermal": 0.0, "samples": 30}
    assert "the card ran at 1650 MHz and 690 W, held down by its power limit in 95% of the samples" in format_profile(result)
    result["syncs"] = []
    assert "No ATen operator in the step synchronises" in format_profile(result)
    result["syncs"] = ["model.py:236: called a synchronizing CUDA operation"]
    text = format_profile(result)
    assert "1 ATen operator call(s) in the step synchronise the host with the GPU: `model.py:236" in text


def test_device_gaps_measure_idle_time_between_kernels_over_the_steps():
    """Kernels [0,10] and [5,12] overlap (busy 12 us); then idle 3 us before [15,20], an annotation range that
    covers the gap is not a kernel, and a 100 us gap precedes [120,130]; over 2 steps."""
    from types import SimpleNamespace

    from imagegen.train_benchmark import device_gaps, format_profile

    def event(name, start, end, device="CUDA"):
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("a", 0, 10), event("b", 5, 12), event("c", 15, 20), event("Optimizer.step#AdamW.step", 12, 120),
              event("aten::mm", 20, 119, device="CPU"), event("d", 120, 130)]
    gaps = device_gaps(events, steps=2)
    assert gaps["span_ms_per_step"] == pytest.approx(130 / 1e3 / 2)
    assert gaps["busy_ms_per_step"] == pytest.approx(27 / 1e3 / 2)
    counts = {(b["from_us"], b["to_us"]): (b["per_step"], b["ms_per_step"] * 2e3) for b in gaps["buckets"]}
    assert counts[(0, 5)] == (0.5, pytest.approx(3)) and counts[(100, float("inf"))] == (0.5, pytest.approx(100))
    assert counts[(5, 20)] == counts[(20, 100)] == (0, 0)
    assert [(g["us"], g["after"], g["before"]) for g in gaps["longest"]] == [(100, "c", "d"), (3, "b", "c")]
    assert [(g["after"], g["before"], g["per_step"], g["ms_per_step"] * 2e3) for g in gaps["by_pair"]] == [
        ("c", "d", 0.5, pytest.approx(100)), ("b", "c", 0.5, pytest.approx(3))]
    assert gaps["timeline"] == [[55, 10, "d"]]  # the second of the two steps' spans starts at 65 us
    result = {"model": "sparse", "size": "s", "N": 16, "batch": 2, "device": "GPU", "torch": "2.x",
              "timed_ms_per_step": 0.1, "launches_per_step": 2, "groups": {"other": 0.0135}, "kernels": [],
              "gaps": gaps}
    assert "| 100 | `c` | `d` |" in format_profile(result) and "| `c` | `d` | 0.5 | 0.050 |" in format_profile(result)


def test_profile_leaves_out_annotation_ranges_but_keeps_kernels_named_with_lambdas():
    from imagegen.train_benchmark import ANNOTATION

    assert ANNOTATION.match("Optimizer.step#AdamW.step")
    kernel = "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, {lambda(float, float)#1}> >"
    assert not ANNOTATION.match(kernel)


def test_train_benchmark_times_each_mlp_backend_of_the_chosen_models(tmp_path):
    names, _ = quick_train_rows(tmp_path, "--models", "sparse", "--mlp-backends", "torch", "cublaslt")
    assert names == ["sparse", "sparse, cublaslt MLP"]


def test_train_benchmark_times_each_inductor_setting(tmp_path):
    """--inductor: one row of our model per torch._inductor.config setting ("none": Inductor's defaults)."""
    names, _ = quick_train_rows(tmp_path, "--models", "sparse", "--inductor", "none", "coordinate_descent_tuning=False")
    assert names == ["sparse", "sparse, coordinate_descent_tuning=False"]


def test_inductor_settings_are_parsed_as_literals():
    from imagegen.train_benchmark import inductor_settings

    assert inductor_settings("triton.max_tiles=3, max_autotune=True,triton.descriptive_names=torch") == {
        "triton.max_tiles": 3, "max_autotune": True, "triton.descriptive_names": "torch"}
    assert inductor_settings("") == inductor_settings("none") == {}
    with pytest.raises(ValueError, match="key=value"):
        inductor_settings("max_autotune")
    with pytest.raises(ValueError, match="no Inductor setting 'triton.no_such_thing'"):
        inductor_settings("triton.no_such_thing=1")


@pytest.mark.parametrize("what,sizes", [("train", ["3"]), ("profile", ["-1"]), ("tune", ["0", "2"]),
                                        ("profile", ["2"])])
def test_benchmark_refuses_sizes_it_does_not_have(what, sizes):
    """A size index out of range stops the script before anything runs (train has sizes 0-2, or 0-1 with
    --quick; tune 0-1)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), what, "--quick", "--sizes", *sizes],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"--sizes for {what} are 0 to" in done.stderr


@pytest.mark.parametrize("index", [0, 1, 2])
def test_gemm_survey_lists_every_matmul_flop_of_a_step(index):
    """`benchmark.py gemms` times a step's GEMMs: their FLOPs add up to 6 per Linear weight per token."""
    from imagegen.gemm_survey import step_gemms
    from imagegen.model import ImageTransformer
    from imagegen.train_benchmark import SIZES, size_config

    size = SIZES[index]
    model = ImageTransformer(size_config("sparse", size))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = size[-1] * model.grid.num_tokens
    assert sum(2 * g["M"] * g["N"] * g["K"] * g["per_step"] for g in step_gemms(size)) == 6 * weights * tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("what", ["dgelu", "gemms", "mlp"])
def test_gpu_only_benchmarks_say_so_on_a_cpu(what):
    """The benchmarks that time CUDA kernels stop with a clear message instead of a traceback."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), what],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"'{what}' measures CUDA kernels and needs a GPU" in done.stderr


@pytest.mark.parametrize("fits_up_to", [0, 1, 3, 4, 5, 37, 64, 100, 128, 500])
def test_largest_batch_doubles_then_bisects_to_the_exact_largest(fits_up_to):
    """`benchmark.py largest` finds the largest batch that fits, not only a power of two, in few trials."""
    from imagegen.train_benchmark import largest_batch

    batch, result, tried = largest_batch(lambda b: {"batch": b} if b <= fits_up_to else None, max_batch=100)
    assert batch == min(fits_up_to, 100)
    assert result == ({"batch": batch} if batch else None)
    assert len(tried) == len(set(tried)) <= 2 * 8  # doubling to 128, then halving a gap of at most 64
    assert max(tried) <= 100 and (batch == 100 or batch + 1 in tried or fits_up_to == 0)


def test_largest_table_names_the_cap_and_the_batches_tried():
    from imagegen.train_benchmark import format_largest

    row = {"model": "sparse", "activation_checkpointing": False, "batch": 6, "tried": [1, 2, 4, 8, 6, 7],
           "peak_mem_gib": 70.2, "s_per_step_eager": 0.4}
    table = format_largest({"device": "NVIDIA H200", "memory_gib": 139.8, "cap_gib": 79.0, "max_batch": 128,
                            "size": "48L", "largest": [row, {**row, "model": "dense", "batch": 0, "tried": [1]}]})
    assert "capped at 79 of its 140 GiB" in table and "then bisected; at most 128" in table
    assert "| sparse | False | 6 | 73,728 | 70.2 GiB | 0.40 |" in table
    assert "| dense | False | does not fit at batch 1 |" in table
    assert "sparse, checkpointing False: [1, 2, 4, 8, 6, 7]" in table


def test_largest_refuses_a_bad_memory_cap_before_any_work():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "largest", "--memory-gib", "-1"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--memory-gib positive" in done.stderr
