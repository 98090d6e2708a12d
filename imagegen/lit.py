"""The LightningModule: tokenize on the device, next-token cross-entropy, bits/dim, AdamW + warmup/cosine.

Hyperparameters are plain, resolved values (no DictConfig, no modules), so a checkpoint rebuilds with
`ImageGPT.load_from_checkpoint(path)` alone. The tokenizer (with its fitted palette) is a submodule and
travels in the state dict. `torch.compile` wraps the model's loss without registering it, so saved keys
have no `_orig_mod.` prefix and checkpoints load with or without compile.
"""

from __future__ import annotations

import math
import os

import lightning as L
import torch

from imagegen.loggers import wandb_run_id
from imagegen.model import ImageTransformer, ModelConfig
from imagegen.tokenizers import build_tokenizer

CHECKPOINT_FORMAT = 1


class ImageGPT(L.LightningModule):
    def __init__(self, model: dict, tokenizer: dict, optim: dict | None = None, compile: bool = False,
                 compile_mode: str = "default"):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = build_tokenizer(tokenizer)
        cfg = ModelConfig(**model)
        if cfg.vocab_size != self.tokenizer.vocab_size or cfg.channels != self.tokenizer.channels:
            raise ValueError(
                f"model (vocab {cfg.vocab_size}, {cfg.channels} tokens a pixel) does not match tokenizer "
                f"{self.tokenizer.name} (vocab {self.tokenizer.vocab_size}, {self.tokenizer.channels} a pixel)"
            )
        self.model = ImageTransformer(cfg)
        self.optim = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "warmup_steps": 100,
                      "min_lr_ratio": 0.1, **(optim or {})}
        self.metric = self.tokenizer.metric  # bits_per_dim (subpixel) or bits_per_token (palette)
        # what training calls: the model's loss (forward + fp32 cross-entropy), compiled as one graph so the
        # fp32 logits need not be materialised; a bound method, never a registered submodule, so the state
        # dict holds each weight once, without an `_orig_mod.` prefix
        loss = torch.compile(self.model.loss, mode=compile_mode) if compile else self.model.loss
        object.__setattr__(self, "_loss", loss)

    @property
    def grid(self):
        return self.model.grid

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) images -> (B, N) tokens, checking the grid first."""
        H, W = self.grid.height, self.grid.width
        if images.shape[1:3] != (H, W):
            raise ValueError(f"model expects {H}x{W} images, got {tuple(images.shape[1:3])}")
        with torch.no_grad():
            return self.tokenizer.encode(images)

    def nll(self, images: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL in nats over all tokens of the batch."""
        return self._loss(self.tokens(images))

    def training_step(self, images, batch_idx):
        loss = self.nll(images)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, images, batch_idx):
        loss = self.nll(images)
        bs = images.shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"val/{self.metric}", loss / math.log(2), prog_bar=True, batch_size=bs, sync_dist=True)

    def test_step(self, images, batch_idx):
        loss = self.nll(images)
        self.log(f"test/{self.metric}", loss / math.log(2), batch_size=images.shape[0], sync_dist=True)

    def configure_optimizers(self):
        o = self.optim
        decay = [p for p in self.model.parameters() if p.ndim >= 2]  # matrices (incl. embeddings)
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]  # norms, start token
        on_cuda = all(p.is_cuda for p in decay + no_decay)
        scaled = str(self.trainer.precision).startswith("16")  # fp16 loss scaling: fused AdamW would unscale
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"], betas=tuple(o["betas"]), fused=on_cuda and not scaled,
        )
        # cosine over the run's steps; a run bounded by time only (trainer.max_time, max_steps=-1) has no
        # known length: constant after the warmup
        estimated = self.trainer.estimated_stepping_batches
        total = max(1, int(estimated)) if math.isfinite(estimated) else None
        warmup = min(int(o["warmup_steps"]), total or int(o["warmup_steps"]))
        floor = float(o["min_lr_ratio"])

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total is None:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm ourselves: Lightning refuses to clip for a fused optimizer under AMP, but
        without loss scaling (fp32, bf16-mixed) the gradients are already unscaled and clipping is exact."""
        if not gradient_clip_val:
            return
        if str(self.trainer.precision).startswith("16"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"gradient_clip_algorithm {gradient_clip_algorithm!r} is not supported; use norm")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
        self.log("train/grad_norm", norm)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["imagegen"] = {"format": CHECKPOINT_FORMAT, "grid": str(self.grid),
                                  "tokenizer": self.tokenizer.config()}
        run_id = wandb_run_id(self.loggers) if self._trainer is not None else None
        if run_id:  # resuming from this checkpoint in its run dir continues the wandb run (imagegen.training)
            checkpoint["imagegen"].update(wandb_run_id=run_id, run_dir=os.path.abspath(self.trainer.default_root_dir))
