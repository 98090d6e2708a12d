"""scripts/benchmark.py runs end to end in --quick mode (no timing claims on a CPU)."""

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_quick_modes_run(tmp_path):
    for what in ("attention", "sample", "train"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), what, "--quick",
                               "--out", str(tmp_path / f"{what}.json")], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{what}.json").is_file() and "|" in done.stdout


def test_profile_splits_a_step_into_groups_that_add_up(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "profile", "--quick",
                           "--out", str(tmp_path / "profile.json")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "profile.json").read_text())
    assert {"attention", "matmul"} <= set(result["groups"])  # a step runs both
    total = sum(k["ms_per_step"] for k in result["kernels"])
    assert abs(sum(result["groups"].values()) - total) < 1e-6 * max(total, 1)
    assert "| attention |" in done.stdout
