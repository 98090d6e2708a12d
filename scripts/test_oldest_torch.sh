#!/usr/bin/env bash
# The CPU test suite on the oldest PyTorch imagegen supports: torch 2.5.1 with torchvision 0.20.1 (Triton 3.1),
# in a virtual environment of its own, from PyPI (on x86_64 Linux that is torch's CUDA build: about 3 GB).
#
#   bash scripts/test_oldest_torch.sh                   # the whole suite
#   bash scripts/test_oldest_torch.sh -k interpreter    # pytest's arguments pass through
#   VENV=/path/to/venv bash scripts/test_oldest_torch.sh  # another place for the environment (default below)
#   PYTHON=python3.10 VENV=/tmp/oldest bash scripts/test_oldest_torch.sh   # the oldest Python (3.10) as well
#
# With Triton 3.1 the tests that run our kernels in Triton's CPU interpreter skip, saying why (its interpreter
# cannot run them); the tests that compile each kernel for sm_90 run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/imagegen-torch2.5}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.5.1 torchvision==0.20.1
"$VENV/bin/pip" install -q -e '.[dev]'
"$VENV/bin/python" -c "import numpy, sys, torch, triton; print('python', sys.version.split()[0], 'torch',
      torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs "$@"
