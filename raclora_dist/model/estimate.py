"""What a run will hold per rank, estimated before anything loads (``raclora validate``).

Everything is counted on the meta device: the model is built there with its RAC-LoRA layers
injected, so the parameter count, the chain's tensors and the factor sizes are exact. The
saved activations are measured too, not modelled: one forward of the meta model at the
per-rank micro-batch, with autograd's saved-tensor hooks counting what the backward would
keep (attention counted as a fused kernel keeps it: q, k, v, output and log-sum-exp).

What is estimated, per rank:

* **base weights**: full-precision tensors at ``model.dtype``; 4-bit layers as packed codes
  plus their absmax constants; divided by the ranks the engine shards them over (its
  :class:`~raclora_dist.backends.base.Layout`: FSDP2 over a group's ranks, one replica
  group's with ``distributed.replicas`` or one link-sync group's; ZeRO-3 over all), plus the
  largest unit gathered whole while it computes (a decoder block; a sublayer or linear layer with
  FSDP2's ``fsdp_unit``; the embedding or head when they are not split by vocabulary);
* **chain**: each layer's trainable factor, its sketch, and (factored merges) the merged
  links' factors; **master weights**: fp32 copies of 4-bit layers (``raclora.master_weights``);
* **gradients** and **optimizer state** of the factors (AdamW: two fp32 moments); sharded
  as the engine declares (FSDP2 as its weights, ZeRO-2/3 over all ranks);
* **activations** at ``train.batch_size / workers`` x ``data.seq_len``; with activation
  checkpointing, one hidden state per block plus one block recomputed.

Not counted: the engine's communication buffers, the allocator's caching, and the CUDA
context (about 0.5-1 GiB per GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raclora_dist.backends import backend_class
from raclora_dist.backends.base import Layout
from raclora_dist.config import RunConfig
from raclora_dist.core import RacLoraLinear

GiB = 2**30
CHAIN_WARN_SHARE = 0.25  # validate warns when the merged chain at the last link exceeds this share of the base


@dataclass
class Estimate:
    """Bytes per rank by kind (see the module docstring), and the model's size."""

    params: int
    base_params_bytes: int  # the whole base as stored (before sharding)
    rows: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    chain_lines: list[str] = field(default_factory=list)  # what the merged chain holds at the last link
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def table(self) -> str:
        """One line per kind, then the total (for ``raclora validate``)."""
        width = max(len(k) for k in self.rows)
        lines = [f"  {k:<{width}}  {size(v):>10}" + (f"   ({self.notes[k]})" if k in self.notes else "")
                 for k, v in self.rows.items()]
        lines.append(f"  {'total':<{width}}  {size(self.total):>10}")
        return "\n".join(lines)


def size(nbytes: float) -> str:
    """``1.23 GiB`` / ``45.6 MiB`` / ``7.8 KiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def count(n: int) -> str:
    """``7.24 B`` / ``125.1 M`` parameters."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _quantized(name: str, module: nn.Module, cfg: RunConfig) -> bool:
    q = cfg.model.quantization
    return q.enabled and type(module) is nn.Linear and not any(
        name == s or name.endswith("." + s) for s in q.skip_modules)


def _packed_bytes(numel: int, cfg: RunConfig) -> int:
    """A 4-bit weight: two codes per byte, one absmax per block (double quantization: one byte
    per block, plus a float per 256 blocks)."""
    q = cfg.model.quantization
    blocks = math.ceil(numel / q.blocksize)
    constants = blocks + 4 * math.ceil(blocks / 256) if q.double_quant else 4 * blocks
    return math.ceil(numel / 2) + constants


def engine_layout(cfg: RunConfig) -> Layout:
    """Where the configured engine keeps the tensors on each of ``distributed.workers`` ranks,
    as the engine declares it (:meth:`raclora_dist.backends.Backend.plan`)."""
    return backend_class(cfg.distributed.strategy).plan(cfg, cfg.distributed.workers)


def _nbytes(module: nn.Module, cfg: RunConfig, prefix: str) -> int:
    """A module's base tensors as stored (4-bit weights packed), chain tensors left out."""
    total = 0
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, RacLoraLinear):
            continue  # its base is counted as the child module ``base_layer``
        for attr, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                total += _packed_bytes(t.numel(), cfg) if attr == "weight" and _quantized(name, m, cfg) else t.nbytes
    return total


def _in_flight(cfg: RunConfig, layout: Layout, model: nn.Module, blocks: list[nn.Module],
               block_bytes: list[int]) -> tuple[int, str]:
    """The largest unit a sharding engine gathers whole while it computes, and what it is.

    A decoder block (or the engine's unit of it, ``layout.gather_unit``: its largest sublayer
    or linear layer, or what the block keeps besides them, as workers on this machine would
    choose); the untied embedding and head too, unless the engine splits them by vocabulary
    rows, which gathers no weights.
    """
    from raclora_dist.backends.dist import worker_device_type
    from raclora_dist.backends.fsdp2 import inner_units
    from raclora_dist.backends.vocab_parallel import splittable

    names = {id(m): n for n, m in model.named_modules()}
    units: list[tuple[int, str]] = []
    for block, whole in zip(blocks, block_bytes, strict=True):
        unit = layout.gather_unit(worker_device_type(cfg.distributed.backend), whole)
        inner = [_nbytes(m, cfg, names.get(id(m), "")) for m in inner_units(block, unit)]
        if inner:
            units.append((max(inner), f"one {'linear layer' if unit == 'linear' else 'sublayer'}"))
            units.append((whole - sum(inner), "one block's norms"))
        else:
            units.append((whole, "one block"))
    get_head = getattr(model, "get_output_embeddings", None)
    embedding, head = getattr(model, "get_input_embeddings")(), get_head() if callable(get_head) else None  # noqa: B009 -- a PreTrainedModel's
    tied = embedding is not None and head is not None and head.weight is embedding.weight  # never split
    for what, module in (("the embedding", embedding), ("the head", head)):
        if module is not None and not (layout.splits_vocab and not tied and splittable(module, model)):
            units.append((sum(t.nbytes for t in module.parameters()), what))
    return max(units, key=lambda u: u[0], default=(0, "nothing"))


def estimate_memory(cfg: RunConfig, model: nn.Module, blocks: list[nn.Module]) -> Estimate:
    """Per-rank memory of a run.

    Args:
        model: the base on the meta device with its RAC-LoRA layers injected (not trained,
            not moved; a forward runs on it under ``torch.no_grad`` off).
        blocks: its decoder blocks (empty if it has none).
    """
    layout = engine_layout(cfg)
    chain_ids: set[int] = set()
    chain = master = factor_bytes = factor_numel = 0
    layers = [m for m in model.modules() if isinstance(m, RacLoraLinear)]
    for layer in layers:
        for t in [*layer._parameters.values(), *layer._buffers.values()]:
            if t is not None:
                chain_ids.add(id(t))
                chain += t.nbytes
        factor_bytes += layer.factor.nbytes
        factor_numel += layer.factor.numel()
        if layer.master_weights != "none":
            master += 4 * layer.out_features * layer.in_features
    base_bytes = params = 0
    block_bytes = [0] * len(blocks)
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or id(t) in chain_ids or id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = _packed_bytes(t.numel(), cfg) if attr == "weight" and _quantized(name, module, cfg) else t.nbytes
            if isinstance(t, nn.Parameter):
                params += t.numel()
            base_bytes += nbytes
            if id(module) in block_of:
                block_bytes[block_of[id(module)]] += nbytes
    est = Estimate(params=params, base_params_bytes=base_bytes)
    split = layout.weight_ranks
    in_flight, what = _in_flight(cfg, layout, model, blocks, block_bytes) if split > 1 else (0, "")
    est.rows["base weights"] = base_bytes // split + in_flight
    if split > 1:
        est.notes["base weights"] = f"1/{split} of {size(base_bytes)}, plus {what} gathered"
    else:
        est.notes["base weights"] = "a full replica on every rank"
    if layout.weights_offloaded:
        est.notes["base weights"] += "; shards kept in CPU memory"
    est.rows["chain"] = chain // split
    est.notes["chain"] = f"{factor_numel:,} trainable factor elements; sketches; merged links"
    _merged_chain(cfg, layers, est, split)
    if master:
        est.rows["master weights"] = master // split
        est.notes["master weights"] = f"fp32, on {'the CPU' if cfg.raclora.master_weights == 'cpu' else 'the device'}"
    opt_split = layout.state_ranks
    est.rows["gradients"] = factor_bytes // opt_split
    moments = 2 * 4 * factor_numel if cfg.train.optimizer == "adamw" else 0
    est.rows["optimizer state"] = moments // opt_split
    est.notes["optimizer state"] = cfg.train.optimizer + (f", 1/{opt_split} per rank" if opt_split > 1 else "")
    if layout.state_offloaded:
        for row in ("gradients", "optimizer state"):
            est.notes[row] = est.notes.get(row, "") + ("; " if row in est.notes else "") + "in CPU memory"
    est.rows["activations"] = activation_bytes(cfg, model, blocks)
    micro = cfg.train.batch_size // cfg.distributed.workers
    est.notes["activations"] = (f"{micro} x {cfg.data.seq_len} tokens, "
                                f"checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}")
    return est


def _dtypes(layers: list[RacLoraLinear]) -> str:
    """The chains' dtypes by name (``raclora.chain_dtype`` as the layers resolved it)."""
    return "/".join(sorted({str(layer.chain_A.dtype).removeprefix("torch.") for layer in layers}))


def _merged_chain(cfg: RunConfig, layers: list[RacLoraLinear], est: Estimate, split: int) -> None:
    """The merged chain at the last link (its tensors are preallocated at their cap, so the
    injected layers hold exactly that), what it costs per token, what the exact chain would
    hold, and a warning when it outgrows ``CHAIN_WARN_SHARE`` of the base."""
    rc = cfg.raclora
    held = sum(layer.chain_B.nbytes + layer.chain_A.nbytes for layer in layers)
    if not any(layer.merge_mode == "factored" for layer in layers):
        est.chain_lines.append("merged links: added into the base weights (merge_mode into_base), no chain held")
        return
    cols = sum(layer.chain_A.shape[0] * (layer.out_features + layer.in_features) for layer in layers)
    dense = sum(layer.out_features * layer.in_features for layer in layers)
    exact = sum(min(rc.links * rc.rank, layer.out_features, layer.in_features)
                * (layer.out_features + layer.in_features) * layer.chain_A.element_size() for layer in layers)
    caps = sorted({layer.chain_A.shape[0] for layer in layers})
    if rc.max_chain_rank:
        rule = f"raclora.max_chain_rank {rc.max_chain_rank}"
    elif rc.chain_budget:
        rule = f"raclora.chain_budget {rc.chain_budget:g}"
        if rc.chain_links:
            rule += f", raclora.chain_links {rc.chain_links}"
    else:
        rule = "exact: raclora.chain_budget null"
    share = held / max(est.base_params_bytes, 1)
    est.chain_lines.append(
        f"merged chain at link {rc.links}: {size(held // split)} per rank ({100 * share:.1f} % of the base weights), "
        f"{caps[0]}-{caps[-1]} columns per layer in {_dtypes(layers)} ({rule}); {100 * cols / dense:.1f} % of the "
        "adapted layers' compute "
        "per token")
    if exact > held:
        est.chain_lines.append(f"  recompressed by SVD once full; the exact chain would hold {size(exact // split)} "
                               f"per rank by then (energy dropped is logged per link: discarded_energy)")
    if share > CHAIN_WARN_SHARE:
        est.warnings.append(
            f"the merged chain reaches {size(held // split)} per rank by link {rc.links}, {100 * share:.0f} % of the base "
            f"weights (more than {100 * CHAIN_WARN_SHARE:.0f} %); lower raclora.chain_budget, raclora.chain_links or "
            "raclora.max_chain_rank to cap it")


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel on the meta device: keeps what flash and
    memory-efficient attention keep for the backward, and nothing of size seq x seq."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the estimate does no backward
        raise NotImplementedError


def _attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function for transformers' interface: (b, heads, s, d) in, (b, s, heads, d) out."""
    out = _FusedAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def activation_bytes(cfg: RunConfig, model: nn.Module, blocks: list[nn.Module]) -> int:
    """Bytes the backward keeps from one forward at the per-rank micro-batch (meta device)."""
    micro = max(cfg.train.batch_size // cfg.distributed.workers, 1)
    per_block = [0] * len(blocks)
    current: list[int] = []
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in own and storage._cdata not in saved:
            saved[storage._cdata] = storage.nbytes()
            if current:
                per_block[current[-1]] += storage.nbytes()
        return t

    def leave(module, args, output) -> None:  # returns None: the output stays as it is
        current.pop()

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        hooks.append(b.register_forward_hook(leave))
    config: Any = model.config  # a transformers PretrainedConfig
    previous = getattr(config, "_attn_implementation", None)
    try:
        from transformers import AttentionInterface

        AttentionInterface.register("raclora_estimate", _attention)
        config._attn_implementation = "raclora_estimate"
    except ImportError:  # older transformers: the model's own attention is counted
        previous = None
    tokens = torch.zeros(micro, cfg.data.seq_len, dtype=torch.long, device="meta")
    was_training = model.training
    try:
        model.train()
        factors = {id(m.factor) for m in model.modules() if isinstance(m, RacLoraLinear)}
        for p in model.parameters():  # what the run trains: the factors alone
            p.requires_grad_(id(p) in factors)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=tokens, labels=tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        if previous is not None:
            config._attn_implementation = previous
    total = sum(saved.values())
    if not cfg.train.activation_checkpointing or not blocks:
        return total
    hidden = micro * cfg.data.seq_len * config.hidden_size * _dtype_bytes(cfg)
    # Each block keeps only its input; the backward recomputes one block at a time.
    return total - sum(per_block) + len(blocks) * hidden + max(per_block)


def _dtype_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.model.dtype != "float32" or cfg.distributed.mixed_precision == "bf16" else 4
