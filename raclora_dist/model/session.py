"""Assembles what a run trains: tokenizer, base model, injected layers and the chain.

The base is never built whole. Its architecture is built on the meta device, and it is made
real one part at a time (each decoder block, then the embedding, final norm and head; see
:func:`raclora_dist.model.weights.load_units`). Each part goes through the same steps
before the next one arrives:

1. **materialize**: its tensors stream in from the weight source, on the device;
2. **quantize**: its linear layers become 4-bit (``model.quantization``), on the device;
3. **wrap**: its target layers get their RAC-LoRA wrappers;
4. **replay**: a resumed run re-applies its merged links to these layers (dense and exact,
   as in one process) and restores the current link's sketch and factor;
5. **shard**: a sharding engine partitions the part (``Backend.shard_unit``).

So a rank holds its shards plus one part in flight: never the whole model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raclora_dist.backends import backend_class
from raclora_dist.backends.base import Backend, decoder_layers
from raclora_dist.backends.vocab_parallel import VocabParallelEmbedding, VocabParallelHead, split, splittable
from raclora_dist.checkpoint.folder import Checkpoint
from raclora_dist.config import ConfigError, RunConfig, with_values
from raclora_dist.core import RacLoraChain, RacLoraLinear, RankError, TargetError, match_targets, replay_layer, wrap_targets
from raclora_dist.data.tokenizer import load_tokenizer, tokenizer_source
from raclora_dist.model.build import build_meta_model, save_base, weight_source
from raclora_dist.model.estimate import Estimate, estimate_memory
from raclora_dist.model.heap import mapped_large_allocations, release_between_blocks, release_freed, worth_releasing
from raclora_dist.model.weights import (
    WeightSource,
    load_units,
    materialize,
    meta_tensors,
    tensor_owners,
)
from raclora_dist.observe.metrics import interactive

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """A model with RAC-LoRA layers injected, and its chain."""

    model: nn.Module
    tokenizer: object
    layers: dict[str, RacLoraLinear]
    chain: RacLoraChain


def base_folder(cfg: RunConfig, run_dir: Path) -> Path:
    """Where the untouched base lives: the run's ``base/`` (built from config) or the source."""
    if cfg.model.config is not None:
        return Path(run_dir) / "base"
    from raclora_dist.data.sources import local_folder

    if cfg.model.name_or_path is None:
        raise ConfigError("model: set name_or_path or config")
    return local_folder(cfg.model.name_or_path)


def _targets(model: nn.Module, cfg: RunConfig) -> list[str]:
    try:
        return match_targets(model, cfg.raclora.target_modules)
    except TargetError as err:
        raise ConfigError(str(err)) from None


def _wrap(model: nn.Module, names: list[str], cfg: RunConfig) -> dict[str, RacLoraLinear]:
    """:func:`wrap_targets`, with target and rank problems reported as config errors."""
    try:
        return wrap_targets(model, names, cfg.raclora)
    except (TargetError, RankError) as err:
        raise ConfigError(str(err)) from None


def _meta_injected(cfg: RunConfig) -> tuple[nn.Module, dict[str, RacLoraLinear]]:
    """The model on the meta device with its RAC-LoRA layers injected (no memory, no weights)."""
    tok = load_tokenizer(tokenizer_source(cfg))
    if cfg.model.quantization.enabled:
        # Nothing is quantized on the meta device, so dense layers stand in for the 4-bit
        # ones (merging as 4-bit layers do by default); the 4-bit-only options were already
        # checked with the config.
        mode = "factored" if cfg.raclora.merge_mode == "auto" else cfg.raclora.merge_mode
        # (allow_lossy_merge: on the meta device nothing is merged; the run's own config keeps its rule)
        cfg = with_values(cfg, {"raclora.master_weights": "none", "raclora.stochastic_rounding": False,
                                "raclora.merge_mode": mode, "raclora.allow_lossy_merge": True})
    model = build_meta_model(cfg.model, len(tok))
    for p in model.parameters():  # the base is frozen, as in a run (what the engines shard depends on it)
        p.requires_grad_(False)
    return model, _wrap(model, _targets(model, cfg), cfg)


def validate_model(cfg: RunConfig) -> int:
    """Builds the model on the meta device and injects: catches target/rank errors cheaply.

    Returns:
        The number of layers that would be wrapped.
    """
    return len(_meta_injected(cfg)[1])


def plan_run(cfg: RunConfig) -> tuple[int, Estimate]:
    """:func:`validate_model`, and the run's per-rank memory (:mod:`raclora_dist.model.estimate`).

    Returns:
        The number of layers that would be wrapped, and the estimate.
    """
    model, layers = _meta_injected(cfg)
    return len(layers), estimate_memory(cfg, model, decoder_layers(model, required=False))


def import_libraries(cfg: RunConfig) -> None:
    """Imports what the run will use beyond the model's own code (the engine, bitsandbytes for
    a 4-bit base), so that memory measured from here on is the model's, not the libraries'."""
    backend_class(cfg.distributed.strategy)  # imports the engine
    if cfg.model.quantization.enabled:
        import raclora_dist.quant.bnb  # noqa: F401


def build_session(cfg: RunConfig, backend: Backend | None = None, source: Path | None = None,
                  save_base_to: Path | None = None, ckpt: Checkpoint | None = None) -> Session:
    """Builds tokenizer and base (streamed part by part), quantizes it if the config says so,
    injects the chain, and replays a checkpoint's chain; shards each part as it goes.

    Args:
        cfg: the run config.
        backend: the engine; its ``shard_unit`` partitions each part and its device is where
            the parts are made real. None: one process on the CPU, nothing sharded.
        source: load the base from this folder (a run's ``base/``) instead of
            ``model.name_or_path`` or a from-config initialisation.
        save_base_to: save the untouched base (config-built) and tokenizer here first.
        ckpt: a checkpoint to resume: its merges are replayed on each layer before the
            engine shards it, and its current link's sketches and factors are restored.

    Raises:
        ConfigError: bad targets or rank, missing weights, or a checkpoint that does not
            belong to this model (other layers, other sketches).
    """
    tokenizer = load_tokenizer(tokenizer_source(cfg))
    model = build_meta_model(cfg.model, len(tokenizer), source)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, cfg)
    # the same modules once loaded (parts are made real in place); none: every module with
    # tensors is a part of its own
    blocks = decoder_layers(model, required=False)
    block_bytes = max((sum(t.nbytes for t in b.parameters()) for b in blocks), default=0)  # on meta
    if ckpt is not None:
        names = [d["name"] for d in ckpt.meta.get("layers", [])]
        if names != targets:
            raise ConfigError(f"{ckpt.path}: the checkpoint's layers differ from the model's targets")
    main = backend is None or backend.info.is_main
    weights = weight_source(cfg.model, model, source, bar=main and interactive())
    try:
        if save_base_to is not None:
            save_base(model, weights, tokenizer, save_base_to)
        with mapped_large_allocations():
            layers = _load(model, weights, cfg, targets, backend, ckpt)
        unused = sorted(set(weights.keys()) - getattr(weights, "read", weights.keys()))
    finally:
        weights.close()
    split_names = [n for n, m in model.named_modules() if isinstance(m, (VocabParallelEmbedding, VocabParallelHead))]
    if split_names and backend is not None:
        logger.info(f"split {' and '.join(split_names)} by vocabulary rows across {backend.vocab_split()[1]} ranks")
    if unused:
        logger.info(f"note: {len(unused)} tensor(s) in the checkpoint are not part of the model (e.g. {unused[0]}); ignored")
    chain = RacLoraChain(layers, cfg.raclora.on_nonfinite)
    if ckpt is not None:
        chain.adopt(ckpt.chain)
        chain.link = ckpt.meta["fingerprint_link"]
        _check_fingerprints(chain, ckpt)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if backend is not None and worth_releasing(backend.info.device.type, backend.gathers_blocks, block_bytes):
        release_between_blocks(blocks)
        chain.after_merge = release_freed
    return Session(model, tokenizer, layers, chain)


def _load(model: nn.Module, weights: WeightSource, cfg: RunConfig, targets: list[str],
          backend: Backend | None, ckpt: Checkpoint | None) -> dict[str, RacLoraLinear]:
    """Makes ``model`` real part by part (steps 1-5 of the module docstring); returns the
    wrapped layers in model order."""
    device = backend.info.device if backend is not None else torch.device("cpu")
    owners = tensor_owners(model)  # taken while all on meta: tied tensors are made real once
    q = cfg.model.quantization
    blocks = decoder_layers(model, required=False)
    layers: dict[str, RacLoraLinear] = {}
    for unit in load_units(model, blocks):
        names = set(unit.module_names(model))
        materialize(model, unit, weights, device, owners)
        if q.enabled:
            from raclora_dist.quant.bnb import drop_sources, quantize_model

            quantize_model(model, q, q.storage, keep_source=cfg.raclora.master_weights != "none", within=names)
        wrapped = _wrap(model, [t for t in targets if t in names], cfg)
        module = model.get_submodule(unit.name) if unit.name else model  # quantize/wrap may replace a leaf
        if q.enabled:
            drop_sources(module)
        if ckpt is not None:
            _restore_layers(wrapped, ckpt)
        if backend is not None and backend.splits_vocab and unit.own_unit and splittable(module, model):
            split(model, unit.name, *backend.vocab_split())  # rows kept, never gathered
        elif backend is not None:
            backend.shard_unit(module, unit.own_unit)
        layers.update(wrapped)
    left = meta_tensors(model)
    if left:
        raise RuntimeError(f"loading left {len(left)} tensor(s) on the meta device, e.g. {left[0]}")
    return {name: layers[name] for name in targets}


@torch.no_grad()
def _restore_layers(layers: dict[str, RacLoraLinear], ckpt: Checkpoint) -> None:
    """Replays the checkpoint's merges on unsharded layers (bitwise those of the original run
    on CPU), then sets the sketch the run was in and, mid-link, the factors so far."""
    link = ckpt.meta["fingerprint_link"]
    for name, layer in layers.items():
        replay_layer(layer, ckpt.chain)
        layer.resample(link)
        if name in ckpt.current:
            layer.factor.copy_(ckpt.current[name])


def _check_fingerprints(chain: RacLoraChain, ckpt: Checkpoint) -> None:
    """Sketches are regenerated, not stored: checks they are the ones the run trained with."""
    names = list(chain.layers)
    got = [str(x) for x in chain.fingerprints().tolist()]
    bad = [n for n, a, b in zip(names, got, ckpt.meta["fingerprints"], strict=False) if a != b]
    if bad:
        raise ConfigError(
            f"{ckpt.path}: regenerated sketches of link {chain.link} differ from the checkpoint's "
            f"(first: {bad[0]!r}); was raclora.seed or the sketch code changed?"
        )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recomputes each decoder block in the backward (non-reentrant ``torch.utils.checkpoint``).

    The block's ``forward`` is checkpointed, not its ``__call__``, so an engine's hooks
    (FSDP2's all-gather) stay outside the recompute (transformers' mechanism).

    Raises:
        ConfigError: the model does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.24
        getattr(model, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=kwargs)  # noqa: B009
