"""scripts/benchmark.py runs end to end in --quick mode (no timing claims on a CPU)."""

import subprocess
import sys

from conftest import REPO


def test_benchmark_quick_modes_run(tmp_path):
    for what in ("attention", "sample", "train"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), what, "--quick",
                               "--out", str(tmp_path / f"{what}.json")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{what}.json").is_file() and "|" in done.stdout
