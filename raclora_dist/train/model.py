"""Builds the base causal-LM: from a ``transformers`` config, or from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from raclora_dist.config import ConfigError, ModelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_base_model(mcfg: ModelSection, vocab_size: int, source: str | Path | None = None):
    """Returns a freshly built (or loaded) ``AutoModelForCausalLM`` in eval-free train mode.

    Args:
        mcfg: the ``model`` section.
        vocab_size: the tokenizer's size; the model's vocabulary must cover it.
        source: load from this folder instead (a run's saved ``base/``), if given.

    Raises:
        ConfigError: the transformers config is invalid or its vocabulary is too small.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[mcfg.dtype]
    path = source or mcfg.name_or_path
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        kwargs = dict(mcfg.config or {})
        model_type = kwargs.pop("model_type")
        try:
            hf_cfg = AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.config: {err}") from None
        torch.manual_seed(mcfg.init_seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.config.vocab_size: {model.config.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} tokens"
        )
    return model


def save_base(model, tokenizer, folder: Path) -> None:
    """Saves the untouched base and its tokenizer so exports load without raclora code."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
