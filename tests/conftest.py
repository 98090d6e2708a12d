"""Shared fixtures: Hydra configs composed in-process with outputs redirected to tmp_path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import imagegen.training  # noqa: F401  (registers the config resolvers)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO = Path(__file__).resolve().parents[1]

# A run that takes seconds on a CPU: 8x8 images, 2 layers, 16 colours.
# overrides that only the default option of a group has: dropped when a test picks another option
OPTION_SPECIFIC = {
    "data=synthetic": ["data.num_train=64", "data.num_val=8", "data.num_test=8"],
    "tokenizer=palette": ["tokenizer.num_colors=16", "tokenizer.fit_images=16"],
    "callbacks=default": ["callbacks.sample_grid.every_n_steps=0"],  # sampling is tested on its own
}
TINY = [o for opts in OPTION_SPECIFIC.values() for o in opts] + [
    "size=tiny", "trainer=cpu", "logger=csv", "data.image_size=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0",
    "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "compile=false",
]


def run_python(code: str, **env: str) -> str:
    """Runs `code` in a fresh Python process with `env` added to the environment (e.g. TRITON_INTERPRET="1",
    which Triton reads when it is imported); asserts that it exits 0 and returns what it printed."""
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def triton_version(triton) -> tuple[int, int]:
    """(major, minor) of the installed Triton module."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


# Prepended to code that compiles a kernel without a GPU: compile_for_hopper(kernel, signature, constexprs,
# **options) -> the kernel compiled for sm_90 (H100/H200). signature gives every argument's type ("*bf16", "i32",
# "constexpr" for those in constexprs). Triton >= 3.3 takes it so; 3.1 and 3.2 (torch 2.5, 2.6) take the
# constexprs as `constants` and no "constexpr" entries, 3.1 both keyed by argument position.
COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_hopper(kernel, signature, constexprs, **options):
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    except TypeError:  # Triton < 3.3
        types = {name: kind for name, kind in signature.items() if kind != "constexpr"}
        if triton.__version__.startswith("3.1."):
            types = {kernel.arg_names.index(name): kind for name, kind in types.items()}
            constexprs = {kernel.arg_names.index(name): value for name, value in constexprs.items()}
        source = ASTSource(fn=kernel, signature=types, constants=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
"""

# What our kernels ask of Triton's CPU interpreter: a constexpr handed on to a helper function, and a loop bounded
# by a kernel argument. Triton 3.1's interpreter fails the first (arange of a non-constexpr); before 3.6 it fails the
# second with NumPy >= 2.4 (it converts a one-element array to an int).
INTERPRETER_PROBE = r"""
import torch
import triton
import triton.language as tl


@triton.jit
def _positions(start, BLOCK: tl.constexpr):
    return start + tl.arange(0, BLOCK)


@triton.jit
def _probe(X, n, BLOCK: tl.constexpr):
    for start in range(0, n, BLOCK):
        offsets = _positions(start, BLOCK)
        tl.store(X + offsets, offsets, mask=offsets < n)


x = torch.zeros(10, dtype=torch.int32)
_probe[(1,)](x, 10, BLOCK=4)
assert x.tolist() == list(range(10)), x
"""


@pytest.fixture(scope="session")
def triton_interpreter():
    """Skips a test of our kernels in Triton's CPU interpreter where an older Triton's interpreter (before 3.6)
    cannot run what they are written with (INTERPRETER_PROBE), saying why; compiling them for sm_90 is tested
    apart. From Triton 3.6 on, a probe that fails fails the test."""
    triton = pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        if triton_version(triton) >= (3, 6):
            pytest.fail(f"Triton {triton.__version__}'s CPU interpreter failed the probe kernel: {done.stderr[-3000:]}")
        pytest.skip(f"Triton {triton.__version__}'s CPU interpreter cannot run our kernels' constructs: {last}")


def compose_cfg(overrides, run_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """compose(extra_overrides, run_dir=None) -> a tiny CPU config writing under tmp_path."""

    def make(*extra, run_dir=None):
        base = list(TINY)
        for option, specific in OPTION_SPECIFIC.items():
            group = option.split("=")[0]
            if any(e.startswith(group + "=") and e != option for e in extra):
                base = [o for o in base if o not in specific]
        return compose_cfg(base + list(extra), run_dir or tmp_path / "run")

    return make
