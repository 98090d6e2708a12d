"""imagegen: train ImageGPT-style autoregressive pixel transformers with 2D-aware sparse attention.

See README.md for the quick start and ../DESIGN notes for token order and pattern semantics.
"""

__version__ = "0.1.0"


def load(ckpt_path, device="cpu"):
    """imagegen.load(ckpt_path, device="cpu") -> Pipeline (see imagegen.api)."""
    from imagegen.api import load as _load

    return _load(ckpt_path, device)
