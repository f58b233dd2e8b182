"""The base causal-LM: its architecture on the meta device, and where its weights stream from.

No rank ever builds the whole model in memory: :func:`build_meta_model` gives the
architecture with every tensor on the meta device, and :func:`weight_source` says where the
real tensors come from (a local safetensors folder, or a from-config initialisation). The
session then makes the model real one part at a time (``model/session.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from raclora_dist.config import ConfigError, ModelSection
from raclora_dist.core.dtypes import torch_dtype
from raclora_dist.data.sources import local_folder
from raclora_dist.model.weights import InitFromConfig, SafetensorsFolder, WeightSource, state_shapes, write_safetensors


def hf_config(mcfg: ModelSection, source: str | Path | None = None):
    """The ``transformers`` config of the base: the folder's ``config.json``, or ``model.config``.

    Raises:
        ConfigError: ``model.config`` is not a valid transformers config.
    """
    from transformers import AutoConfig

    path = source or (local_folder(mcfg.name_or_path, weights=False) if mcfg.name_or_path is not None else None)
    if path is not None:
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name_or_path: {str(path)!r} has no usable config.json ({err})") from None
    kwargs = dict(mcfg.config or {})
    model_type = kwargs.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.config: {err}") from None


def build_meta_model(mcfg: ModelSection, vocab_size: int, source: str | Path | None = None):
    """The base ``AutoModelForCausalLM`` with every tensor on the meta device (no memory).

    Args:
        mcfg: the ``model`` section.
        vocab_size: the tokenizer's size; the model's vocabulary must cover it.
        source: a folder to take the architecture from instead (a run's saved ``base/``).

    Raises:
        ConfigError: the config is invalid or its vocabulary is too small.
    """
    from transformers import AutoModelForCausalLM

    cfg = hf_config(mcfg, source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(mcfg.dtype))
    if model.config.vocab_size < vocab_size:
        field = "model.config.vocab_size" if mcfg.config is not None else f"model.name_or_path ({mcfg.name_or_path})"
        raise ConfigError(
            f"data.tokenizer: the tokenizer has {vocab_size} tokens, more than the model's embedding "
            f"({field}: vocab_size {model.config.vocab_size}); use the model's own tokenizer"
        )
    return model


def weight_source(mcfg: ModelSection, meta_model, source: str | Path | None = None,
                  bar: bool = False) -> WeightSource:
    """Where the base's tensors come from: ``source`` or ``model.name_or_path`` (a safetensors
    folder), else a from-config initialisation keyed by ``(model.init_seed, module name)``."""
    path = source or (local_folder(mcfg.name_or_path) if mcfg.name_or_path is not None else None)
    if path is not None:
        return SafetensorsFolder(path, bar=bar)
    return InitFromConfig(meta_model, mcfg.init_seed)


def save_base(meta_model, weights: WeightSource, tokenizer, folder: Path) -> None:
    """Saves the untouched base (sharded safetensors, streamed a tensor at a time), its config
    and tokenizer, so exports load without raclora code. Atomic: written beside, then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_safetensors(weights, state_shapes(meta_model), tmp)
    meta_model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
