"""Compose a training run from a Hydra config and run it (scripts/train.py is a thin wrapper).

Order matters for users: everything cheap is checked first (sizes, patterns, paths, the checkpoint to
resume), then data is read, the palette fitted, and only then does training start.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from imagegen.distributed import check_launch
from imagegen.inductor_sums import installed as column_sums_installed
from imagegen.lit import ImageGPT
from imagegen.loggers import RunCSVLogger, finish_wandb
from imagegen.model import ModelConfig
from imagegen.tokenizers import build_tokenizer


def best_precision() -> str:
    """bf16 mixed precision on GPUs that have it, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


OmegaConf.register_new_resolver("imagegen.precision", best_precision, replace=True)


def model_config(cfg: DictConfig, tokenizer) -> ModelConfig:
    """The model's full config: pattern (model group) + size (size group) + grid (data and tokenizer)."""
    m = cfg.model
    return ModelConfig(
        vocab_size=tokenizer.vocab_size, height=int(cfg.data.image_size), width=int(cfg.data.image_size),
        channels=tokenizer.channels, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
        mlp_ratio=m.mlp_ratio, dropout=m.dropout, layout=list(m.layout),
        pattern_params=OmegaConf.to_container(m.params, resolve=True), backend=m.backend,
        activation_checkpointing=resolve_auto(m.activation_checkpointing, not uses_gpu(cfg)),
        residual_dtype=m.get("residual_dtype", "float32"), mlp_backend=m.get("mlp_backend", "torch"),
    )


def uses_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_auto(value, when_auto: bool) -> bool:
    if value == "auto":
        return when_auto
    if not isinstance(value, bool):
        raise ValueError(f"expected true, false or auto, got {value!r}")
    return value


def load_checkpoint_info(ckpt_path: str) -> dict:
    """A Lightning checkpoint's dictionary, its tensors memory-mapped rather than read."""
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # an old (non-zip) file cannot be memory-mapped
        return torch.load(ckpt_path, map_location="cpu", weights_only=False)


def checkpoint_mismatch(ckpt: dict, model: dict, tokenizer: dict, ckpt_path: str = "the checkpoint") -> list[str]:
    """What differs between a checkpoint and the run that wants to resume it (empty when compatible)."""
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp or "tokenizer" not in hp:
        return [f"{ckpt_path} is not an imagegen checkpoint (no model/tokenizer hyperparameters)"]
    diffs = []
    for key in ("height", "width", "channels", "vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "layout"):
        if hp["model"].get(key) != model.get(key):
            diffs.append(f"model.{key}: checkpoint {hp['model'].get(key)!r}, this run {model.get(key)!r}")
    for key in ("name", "num_colors"):
        if hp["tokenizer"].get(key) != tokenizer.get(key):
            diffs.append(f"tokenizer.{key}: checkpoint {hp['tokenizer'].get(key)!r}, this run {tokenizer.get(key)!r}")
    return diffs


def continued_wandb_run(ckpt: dict, run_dir: str) -> str | None:
    """The wandb run a resumed run logs into: the checkpoint's, when it resumes in the run dir that wrote the
    checkpoint (a crash or a preempted job, as its metrics.csv continues too); None (a new wandb run) when it
    starts a run dir of its own, e.g. a sweep of fine-tunings from one checkpoint, which must not share a run."""
    meta = ckpt.get("imagegen") or {}
    same_dir = meta.get("run_dir") is not None and os.path.abspath(run_dir) == meta["run_dir"]
    return meta.get("wandb_run_id") if same_dir else None


def load_palette(tokenizer, path: str) -> None:
    """Load a palette written by scripts/fit_palette.py."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer.path {path!r} does not exist (write one with scripts/fit_palette.py)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["palette"].shape != tokenizer.palette.shape:
        raise ValueError(f"palette in {path} has {saved['palette'].shape[0]} colours, "
                         f"tokenizer.num_colors is {tokenizer.vocab_size}")
    tokenizer.palette.copy_(saved["palette"])
    tokenizer.fitted.fill_(True)


def build(node, **kwargs):
    """hydra.utils.instantiate, but a bad value raises its own clear error rather than Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise e.__cause__ from None
        raise


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain values (without Hydra's own node), for loggers."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def fit_palette(cfg: DictConfig) -> str:
    """Fit the palette of `cfg.tokenizer` on training pixels of `cfg.data`; save it to `cfg.out`."""
    datamodule = build(cfg.data)
    datamodule.check()
    tokenizer = build_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True))
    if tokenizer.name != "palette":
        raise ValueError(f"only the palette tokenizer is fitted, not {tokenizer.name!r}")
    tokenizer.fit(datamodule.sample_pixels(cfg.tokenizer.get("fit_images", 1000)))
    torch.save({"palette": tokenizer.palette, "config": tokenizer.config()}, cfg.out)
    print(f"saved a {tokenizer.vocab_size}-colour palette to {cfg.out}")
    return cfg.out


def build_logger(cfg: DictConfig, wandb_run_id: str | None = None):
    """The configured logger; wandb continues `wandb_run_id` (a resumed checkpoint's run) when given."""
    if not cfg.get("logger"):
        return False
    if wandb_run_id and str(cfg.logger.get("_target_", "")).endswith(".wandb_logger"):
        return build(cfg.logger, run_id=wandb_run_id)
    return build(cfg.logger)


def build_loggers(cfg: DictConfig, resume_step: int | None = None, wandb_run_id: str | None = None) -> list:
    """The chosen logger, plus a RunCSVLogger writing `<run dir>/metrics.csv`: the local record that
    scripts/compare.py reads whatever logger was chosen, continued from `resume_step` when a resumed run
    writes into the same run dir; wandb continues the resumed checkpoint's run. logger=none: no loggers."""
    logger = build_logger(cfg, wandb_run_id)
    if not logger:
        return []
    if isinstance(logger, RunCSVLogger):
        logger.resume_step = resume_step
        return [logger]
    return [logger, RunCSVLogger(save_dir=cfg.paths.run_dir, resume_step=resume_step)]


def write_run_info(cfg: DictConfig, module: ImageGPT, trainer) -> dict:
    """`<run dir>/run.json`: what a run is, for scripts/compare.py (rank 0 writes it)."""
    per_device = cfg.data.batch_size
    devices = trainer.world_size
    info = {"model": cfg.model.name, "size": cfg.model.size, "tokenizer": module.tokenizer.name,
            "layout": list(module.model.cfg.layout), "params": module.model.num_params(),
            "metric": f"val/{module.metric}", "batch_per_device": per_device, "devices": devices,
            "tokens_per_step": per_device * devices * cfg.trainer.get("accumulate_grad_batches", 1)
            * module.model.grid.num_tokens,
            "compile_mode": str(module.hparams.compile_mode) if module.hparams.compile else "off",
            "residual_dtype": module.model.cfg.residual_dtype, "mlp_backend": module.model.cfg.mlp_backend}
    if trainer.is_global_zero:
        os.makedirs(cfg.paths.run_dir, exist_ok=True)
        with open(os.path.join(cfg.paths.run_dir, "run.json"), "w") as f:
            json.dump(info, f, indent=1)
    return info


def build_callbacks(cfg: DictConfig) -> list:
    return [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def train(cfg: DictConfig) -> dict:
    """Train as `cfg` says; returns the final callback metrics as floats."""
    L.seed_everything(cfg.seed, workers=True)
    # 1. cheap checks, before any data is read
    check_launch(cfg)
    datamodule = build(cfg.data)
    datamodule.check()
    tokenizer_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    tokenizer = build_tokenizer(tokenizer_cfg)
    mcfg = model_config(cfg, tokenizer)
    ckpt_path, resume_step, wandb_run = cfg.get("ckpt_path"), None, None
    if ckpt_path:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"ckpt_path {ckpt_path!r} does not exist")
        ckpt = load_checkpoint_info(ckpt_path)
        resume_step = ckpt.get("global_step")
        wandb_run = continued_wandb_run(ckpt, cfg.paths.run_dir)
        diffs = checkpoint_mismatch(ckpt, mcfg.to_dict(), tokenizer.config(), ckpt_path)
        del ckpt
        if diffs:
            raise ValueError(f"cannot resume from {ckpt_path}: it was trained with another configuration:\n  "
                             + "\n  ".join(diffs))
    compile_model = resolve_auto(cfg.compile, uses_gpu(cfg))
    module = ImageGPT(model=mcfg.to_dict(), tokenizer=tokenizer.config(),
                      optim=OmegaConf.to_container(cfg.optim, resolve=True), compile=compile_model,
                      compile_mode=cfg.get("compile_mode", "default"))
    # 2. the palette: from a file, from the checkpoint being resumed, or fitted on training pixels
    if not module.tokenizer.is_fitted:
        if tokenizer_cfg.get("path"):
            load_palette(module.tokenizer, tokenizer_cfg["path"])
        elif not ckpt_path:
            rank_zero_info(f"fitting a {module.tokenizer.vocab_size}-colour palette on training pixels ...")
            module.tokenizer.fit(datamodule.sample_pixels(cfg.tokenizer.get("fit_images", 1000)))
    rank_zero_info(f"model: {mcfg.n_layer} layers, d={mcfg.n_embd}, {mcfg.n_head} heads, layout {mcfg.layout}, "
                   f"grid {mcfg.grid} = {mcfg.grid.num_tokens} tokens, "
                   f"{module.model.num_params() / 1e6:.2f}M non-embedding parameters")
    # 3. train
    loggers = build_loggers(cfg, resume_step, wandb_run)
    trainer = build(cfg.trainer, logger=loggers or False, callbacks=build_callbacks(cfg),
                    default_root_dir=cfg.paths.run_dir)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))
    info = write_run_info(cfg, module, trainer)
    rank_zero_info(f"batch: {info['batch_per_device']} images per device x {info['devices']} device(s) = "
                   f"{info['tokens_per_step']:,} tokens per optimizer step")
    try:
        with column_sums_installed(compile_model):  # layer norms' final sums in one kernel each (imagegen.inductor_sums)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        wandb = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
        hint = finish_wandb(wandb[0]) if wandb else None
        if hint and trainer.is_global_zero:
            print(hint)
    rank_zero_info(f"run dir: {cfg.paths.run_dir}")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
