"""The Python API: load a checkpoint as a pipeline for notebooks and scripts.

    import imagegen
    pipe = imagegen.load("outputs/.../checkpoints/last.ckpt", device="cuda")
    images = pipe.sample(16, temperature=1.0, top_k=None, seed=0)          # uint8 (16, H, W, 3)
    done = pipe.sample(4, prompt=photos, prompt_rows=32)                     # keep the top 32 pixel rows
    nats = pipe.log_likelihood(images)                                       # (B,) nats per image

Loading reads tensors and plain values only (torch.load(weights_only=True)): a checkpoint cannot run code.
Sampling on a GPU runs a bf16 copy of the model with CUDA graphs (`dtype="auto"`); `dtype=torch.float32`
samples with the weights as they are.
"""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn as nn

from imagegen.lit import CHECKPOINT_FORMAT
from imagegen.model import ImageTransformer, ModelConfig
from imagegen.sampling import Sampler
from imagegen.tokenizers import build_tokenizer


class Pipeline:
    def __init__(self, model: ImageTransformer, tokenizer: nn.Module, config: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.config = config or {}
        self._cast = None  # (dtype, a copy of the model in it), made once for sampling

    def sampling_model(self, dtype: str | torch.dtype = "auto") -> ImageTransformer:
        """The model sampling runs: `auto` = a bf16 copy on GPUs that support bf16, else the model itself.
        The copy is taken once; a pipeline whose weights change afterwards should pass the model's dtype."""
        if dtype == "auto":
            cuda = self.device.type == "cuda"
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
        if dtype is None or dtype == next(self.model.parameters()).dtype:
            return self.model
        if self._cast is None or self._cast[0] != dtype:
            self._cast = (dtype, copy.deepcopy(self.model).to(dtype).eval())
        return self._cast[1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid(self):
        return self.model.grid

    def _check_images(self, images: torch.Tensor, what: str = "images") -> None:
        H, W = self.grid.height, self.grid.width
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (H, W, 3):
            raise ValueError(f"{what} must be uint8 (B, {H}, {W}, 3) for this model, got "
                             f"{images.dtype} {tuple(images.shape)}")

    @torch.no_grad()
    def token_nll(self, images: torch.Tensor) -> torch.Tensor:
        """Per-token NLL in nats, (B, N), in raster token order."""
        self._check_images(images)
        tokens = self.tokenizer.encode(images.to(self.device))
        logits = self.model(tokens).float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")

    def log_likelihood(self, images: torch.Tensor) -> torch.Tensor:
        """log p(image) in nats per image, (B,): minus the summed token NLL."""
        return -self.token_nll(images).sum(1)

    def bits(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image bits per token (palette) or per dimension (subpixel), (B,)."""
        return -self.log_likelihood(images) / (self.grid.num_tokens * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
               prompt: torch.Tensor | None = None, prompt_rows: int = 0, batch_size: int | None = None,
               progress: bool = False, dtype: str | torch.dtype = "auto") -> torch.Tensor:
        """n images, uint8 (n, H, W, 3). With `prompt` (uint8 (n, H, W, 3)), the top `prompt_rows` pixel
        rows of each prompt are kept (after tokenization) and the rest is sampled. `dtype`: see
        sampling_model."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        H, W = self.grid.height, self.grid.width
        if not 0 <= prompt_rows <= H:
            raise ValueError(f"prompt_rows must be in [0, {H}], got {prompt_rows}")
        if prompt_rows and prompt is None:
            raise ValueError("prompt_rows > 0 needs prompt images")
        if prompt is not None:
            self._check_images(prompt, "prompt")
            if prompt.shape[0] != n:
                raise ValueError(f"prompt holds {prompt.shape[0]} images for n={n} samples")
        batch_size = batch_size or n
        per_row = W * self.grid.channels
        model = self.sampling_model(dtype)
        out = []
        for i, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            prefix = None
            if prompt is not None and prompt_rows:
                prefix = self.tokenizer.encode(prompt[start : start + b].to(self.device))[:, : prompt_rows * per_row]
            tokens = Sampler(model, b).generate(
                temperature, top_k, None if seed is None else seed + i, prefix, progress=progress)
            out.append(self.tokenizer.decode(tokens, H, W).cpu())
        return torch.cat(out)


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint imagegen can load safely (weights only): {e}") from e
    meta = ckpt.get("imagegen")
    if meta is None or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not an imagegen checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {meta.get('format')}; this imagegen reads format "
                         f"{CHECKPOINT_FORMAT}")
    return ckpt


def load(ckpt_path: str, device: str | torch.device = "cpu") -> Pipeline:
    """A Pipeline from a training checkpoint (last.ckpt or any periodic one)."""
    ckpt = _read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    model_cfg = dict(hp["model"], activation_checkpointing=False)
    model = ImageTransformer(ModelConfig(**model_cfg))
    tokenizer = build_tokenizer(hp["tokenizer"])
    state = ckpt["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    tokenizer.load_state_dict({k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")})
    return Pipeline(model.to(device), tokenizer.to(device), hp)
