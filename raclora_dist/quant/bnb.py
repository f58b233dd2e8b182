"""bitsandbytes 4-bit bases: quantize a model's linear layers, and RAC-LoRA over ``Linear4bit``.

A ``Linear4bit`` holds ``W (m, n)`` as packed 4-bit codes (``quant_storage`` elements, shape
``(m n / (2 * bytes per element), 1)``) plus a ``QuantState`` (per-block absmax, codebook,
shape, dtype). Merge modes on such a base (docs/quantization.md, "Merge modes on a 4-bit base"):

* ``factored`` (default): the packed weight is never touched; exact.
* ``into_base`` in place: dequantize, add ``s B A``, requantize. A small update is mostly
  rounded back to the old codes; optional stochastic rounding keeps it unbiased in
  expectation (but noisy).
* ``into_base`` with a master copy: the original high-precision weight is kept (flat, as
  this rank's slice under sharding, on the device or the CPU); merges go into it and the
  4-bit weight is re-derived from it, so rounding never compounds.

Importing this module registers :class:`Linear4bitRacLora` with the layer dispatch.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn

from raclora_dist.core import RacLoraLinear, register_dispatcher, sketch_seed
from raclora_dist.core.dtypes import torch_dtype
from raclora_dist.core.landed import MergeResult, landed_stats, lowrank_fro_norm
from raclora_dist.core.layer import MergeView
from raclora_dist.core.master import Gather
from raclora_dist.quant.config import QuantizationConfig


# -- quantization ------------------------------------------------------------------------
def quantize_weight(W: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool,
                    storage: torch.dtype) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Packs ``W (m, n)`` into 4-bit codes; returns ``(packed (P, 1), state)``."""
    return bnbf.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant,
                              quant_type=quant_type, quant_storage=storage)


def requantize_like(W: torch.Tensor, state: bnbf.QuantState, storage: torch.dtype) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Quantizes ``W (m, n)`` with the settings of an existing ``state``."""
    return quantize_weight(W.to(state.dtype), state.quant_type, state.blocksize, state.nested, storage)


def dequantize(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The dense (m, n) fp32 weight that packed codes and their state stand for."""
    return bnbf.dequantize_4bit(packed, state).float()


@torch.no_grad()
def stochastic_round(W: torch.Tensor, code: torch.Tensor, blocksize: int, generator: torch.Generator) -> torch.Tensor:
    """Rounds ``W (m, n)`` to the 4-bit grid of each block, up or down at random, unbiased.

    Each block of ``blocksize`` elements is scaled by its absmax into [-1, 1]; an element
    between grid points ``c_lo <= v <= c_hi`` becomes ``c_hi`` with probability
    ``(v - c_lo) / (c_hi - c_lo)``, so ``E[result] = W``. The block's largest element sits on
    the grid (+-1), so the absmax, and hence the codes bitsandbytes then picks, are kept.

    Returns:
        A new (m, n) fp32 tensor on the grid (quantizing it is exact up to absmax rounding).
    """
    shape, flat = W.shape, W.float().flatten()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    v = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    grid = torch.unique(code.float().to(W.device))  # sorted
    hi = torch.searchsorted(grid, v.contiguous()).clamp(1, grid.numel() - 1)
    c_lo, c_hi = grid[hi - 1], grid[hi]
    p_up = ((v - c_lo) / (c_hi - c_lo)).clamp(0, 1)
    u = torch.rand(v.shape, generator=generator).to(W.device)
    q = torch.where(u < p_up, c_hi, c_lo) * absmax
    return q.flatten()[: flat.numel()].view(shape)


def disable_cpu_repack(module: nn.Module) -> nn.Module:
    """Keeps every ``Linear4bit`` in ``module`` in bitsandbytes' standard layout (in place).

    On CPUs with AVX512-BF16, bitsandbytes repacks ``weight.data`` and its quant state into a
    CPU-only layout at the first no-grad eval forward. Merges, sharding and checkpoints need
    the standard layout, and the repacking fails for ``in_features < blocksize``. Applies to
    layers made here and to those ``transformers`` loads with a ``BitsAndBytesConfig``.
    """
    for m in module.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # type: ignore[assignment]  # a bool flag bitsandbytes reads
    return module


def to_linear4bit(linear: nn.Linear, qcfg: QuantizationConfig, storage: torch.dtype) -> Linear4bit:
    """A frozen ``Linear4bit`` holding ``linear``'s weight in 4 bits (its bias as is)."""
    packed, state = quantize_weight(linear.weight.detach(), qcfg.method, qcfg.blocksize, qcfg.double_quant, storage)
    q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   compute_dtype=torch_dtype(qcfg.compute_dtype), compress_statistics=qcfg.double_quant,
                   quant_type=qcfg.method, quant_storage=storage, device="meta")
    q.weight = Params4bit(packed, requires_grad=False, quant_state=state, blocksize=qcfg.blocksize,
                          compress_statistics=qcfg.double_quant, quant_type=qcfg.method,
                          quant_storage=storage, bnb_quantized=True, module=q)
    q.quant_state = state  # where FSDP-gathered weights recover it from (bitsandbytes' convention)
    disable_cpu_repack(q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


@torch.no_grad()
def quantize_model(model: nn.Module, qcfg: QuantizationConfig, storage: str, keep_source: bool = False,
                   within: Collection[str] | None = None) -> list[str]:
    """Replaces every ``nn.Linear`` not in ``qcfg.skip_modules`` with a 4-bit one (in place).

    Quantize before sharding: engines then shard the packed codes. Each weight is quantized
    on the device it lives on (bitsandbytes' CUDA kernels on a GPU).

    Args:
        storage: the packed storage dtype name (``QuantizationConfig.storage``).
        keep_source: keep each original weight (fp32) on the new module for a master copy;
            :class:`Linear4bitRacLora` takes it, :func:`drop_sources` frees the rest.
        within: only these qualified module names (one part of a model being loaded);
            None: the whole model.

    Returns:
        The qualified names of the quantized layers.
    """
    names = []
    for name, module in list(model.named_modules()):
        if within is not None and name not in within:
            continue
        if type(module) is not nn.Linear or any(name == s or name.endswith("." + s) for s in qcfg.skip_modules):
            continue
        q = to_linear4bit(module, qcfg, torch_dtype(storage))
        if keep_source:
            q._raclora_source = module.weight.detach().float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        names.append(name)
    return names


def hf_quantization_config(qcfg: QuantizationConfig, storage: str = "uint8") -> dict:
    """``transformers.BitsAndBytesConfig`` keyword arguments that quantize a base exactly as
    :func:`quantize_model` does (to load an exported adapter onto the 4-bit base)."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": qcfg.method, "bnb_4bit_use_double_quant": qcfg.double_quant,
            "bnb_4bit_compute_dtype": qcfg.compute_dtype, "bnb_4bit_quant_storage": storage,
            "llm_int8_skip_modules": list(qcfg.skip_modules)}


@torch.no_grad()
def dequantize_model(model: nn.Module) -> None:
    """Replaces every wrapped layer and ``Linear4bit`` with a plain ``nn.Linear`` holding its
    effective weight in fp32 (dequantized base plus the chain), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RacLoraLinear):
            W, base = module.effective_weight(), cast(Any, module.base_layer)
        elif isinstance(module, Linear4bit):
            W, base = dequantize(module.weight.data, module.quant_state), module
        else:
            continue
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        dense.weight.data = W
        if base.bias is not None:
            dense.bias.data = base.bias.detach().float().clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)


def drop_sources(model: nn.Module) -> None:
    """Frees original weights that :func:`quantize_model` kept and no wrapper took."""
    for module in model.modules():
        module.__dict__.pop("_raclora_source", None)


def set_quant_state(module: Linear4bit, state: bnbf.QuantState) -> None:
    """Points the layer (and its weight, when it is still a ``Params4bit``) at a new state."""
    module.quant_state = state
    if isinstance(module.weight, Params4bit):
        module.weight.quant_state = state


# -- the RAC-LoRA wrapper ------------------------------------------------------------------
class Linear4bitRacLora(RacLoraLinear):
    """:class:`RacLoraLinear` over a bitsandbytes ``Linear4bit`` base.

    Args (beyond :class:`RacLoraLinear`'s):
        master_weights: ``into_base`` only: ``none`` (requantize in place), or keep a fp32
            master copy of the original weight on the ``device`` or the ``cpu``.
        stochastic_rounding: ``into_base`` only: round the merged weight to the 4-bit grid
            stochastically (unbiased) instead of to nearest.
    """

    packed_base = True  # engines gather the whole packed weight to merge into it
    base_layer: Any  # bitsandbytes' Linear4bit (its weight's quant_state, its code book)

    def __init__(self, base_layer: Linear4bit, name: str, **kwargs) -> None:
        super().__init__(base_layer, name, **kwargs)
        self.storage = base_layer.quant_storage

    def rounds_merges(self) -> bool:
        return True  # whatever dtype stores the packed codes

    def master_source(self) -> torch.Tensor:
        """The original (pre-quantization) weight that :func:`quantize_model` kept."""
        source = self.base_layer.__dict__.pop("_raclora_source", None)
        if source is None:
            raise ValueError(f"module {self.name!r}: a master copy needs the original weights "
                             "(quantize_model(keep_source=True))")
        return source

    def dense_base_weight(self) -> torch.Tensor:
        return dequantize(self.base_layer.weight.data, self.base_layer.quant_state)

    def merge_into_base(self, view: MergeView, B: torch.Tensor, A: torch.Tensor) -> MergeResult:
        """Requantizes the whole packed weight in ``view`` with ``s B A`` added; the codes are
        overwritten in place (same shape) and the layer takes the new quant state."""
        if view.weight is None:
            raise ValueError(f"module {self.name!r}: a packed merge's view must hold the packed codes")
        packed, res = self.requantize(view.weight, B, A, gather=view.gather, owner=view.owner)
        view.weight.copy_(packed)
        return res

    @torch.no_grad()
    def requantize(self, packed: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                   gather: Gather | None = None, owner: bool = True) -> tuple[torch.Tensor, MergeResult]:
        """Merges ``s B A`` into the whole packed weight; sets the layer's new quant state.

        Deterministic, so every rank of a sharded run computes the same codes (the random
        bits of stochastic rounding are keyed by (seed, link, module name)).

        Args:
            packed: the whole packed weight (P, 1) (gathered if sharded); not modified here.
            B: (m, r). A: (r, n): the link's factors.
            gather: collects the master copy's slices of all ranks (collective); None when
                this process holds the whole master.
            owner: whether to compute the landed statistics (a dequantize of the whole weight);
                the chain counts rank 0's, so other ranks may skip it.

        Returns:
            The new packed weight (P, 1) and the merge result.
        """
        state = self.base_layer.quant_state
        before = dequantize(packed, state)
        intended = self.scale * (B.float() @ A.float())
        if self.master is not None:
            self.add_to_master(B, A)
            target = self.master_rows_of(0, self.out_features, gather).to(before.device)
        else:
            target = before + intended
        if self.stochastic_rounding:
            gen = torch.Generator().manual_seed(sketch_seed(self.seed, self.sketch_link, self.name + "#round"))
            target = stochastic_round(target, state.code, state.blocksize, gen)
        new_packed, new_state = requantize_like(target, state, packed.dtype)
        set_quant_state(self.base_layer, new_state)
        if owner:
            landed = landed_stats(dequantize(new_packed, new_state) - before, intended)
        else:
            landed = torch.zeros(3, dtype=torch.float64)
        return new_packed, MergeResult(self.scale * lowrank_fro_norm(B, A), landed)

    def extra_repr(self) -> str:
        extra = f", master_weights={self.master_weights}" if self.master_weights != "none" else ""
        return super().extra_repr() + extra + (", stochastic_rounding=True" if self.stochastic_rounding else "")


def _linear4bit(module: nn.Module) -> type[RacLoraLinear] | None:
    return Linear4bitRacLora if isinstance(module, Linear4bit) else None


register_dispatcher("bitsandbytes.nn.Linear4bit", _linear4bit)
