"""Every option of every config group composes, and what it names instantiates."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from imagegen.lit import ImageGPT
from imagegen.tokenizers import build_tokenizer
from imagegen.training import build_callbacks, build_logger, model_config

from conftest import CONF_DIR, compose_cfg

GROUPS = ["model", "size", "data", "tokenizer", "trainer", "logger", "callbacks", "experiment"]


def options(group):
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES)
def test_option_composes_and_instantiates(group, option, tiny_cfg, tmp_path):
    extra = [f"{group}={option}"]
    if (group, option) in (("data", "folder"), ("experiment", "emoji")):
        extra.append(f"data.path={tmp_path}")
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        extra += ["trainer.accelerator=cpu", "trainer.precision=32-true"]  # the rest of it still instantiates
    if group == "size":  # keep the grid tiny so that even the 48-layer size builds quickly
        extra.append("data.image_size=4")
    # an experiment sets several groups itself: compose it as a user would, on top of the defaults only
    cfg = compose_cfg(extra, tmp_path) if group == "experiment" else tiny_cfg(*extra)
    tokenizer = build_tokenizer(cfg.tokenizer)
    module = ImageGPT(model=model_config(cfg, tokenizer).to_dict(), tokenizer=tokenizer.config())
    assert module.model.cfg.n_layer == cfg.model.n_layer >= 2
    datamodule = instantiate(cfg.data)
    assert datamodule.image_size == cfg.data.image_size
    logger = build_logger(cfg)
    if group == "trainer" and option == "fsdp" and not torch.cuda.is_available():
        from lightning.pytorch.strategies import FSDPStrategy

        assert isinstance(instantiate(cfg.trainer.strategy), FSDPStrategy)  # the rest needs GPUs
        with pytest.raises(Exception, match="requires a GPU"):
            instantiate(cfg.trainer, logger=logger, default_root_dir=str(tmp_path))
        return
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=build_callbacks(cfg), default_root_dir=str(tmp_path))
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("key,default,other,bad", [("residual_dtype", "float32", "autocast", "bf16"),
                                                   ("mlp_backend", "torch", "fused", "triton")])
@pytest.mark.parametrize("model", options("model"))
def test_speed_setting_reaches_the_model(model, key, default, other, bad, tiny_cfg):
    """model.residual_dtype and model.mlp_backend are keys of every model option, passed through to the model;
    a bad value fails when the config is built."""
    cfg = tiny_cfg(f"model={model}")
    tokenizer = build_tokenizer(cfg.tokenizer)
    assert cfg.model[key] == default
    assert getattr(model_config(cfg, tokenizer), key) == default
    assert getattr(model_config(tiny_cfg(f"model={model}", f"model.{key}={other}"), tokenizer), key) == other
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        model_config(tiny_cfg(f"model={model}", f"model.{key}={bad}"), tokenizer)
