"""Pure-torch RAC-LoRA: the layer, sketches, the chain and export math.

Imports nothing heavier than torch and pydantic (no ray, deepspeed, bitsandbytes or
transformers); a test checks this in a fresh interpreter.
"""

from raclora_dist.core.chain import (
    ChainState,
    Comm,
    DenseAccess,
    FactorAccess,
    LinkRecord,
    LocalComm,
    NonFiniteFactorError,
    RacLoraChain,
    SketchMismatchError,
    link_factors,
    replay_layer,
)
from raclora_dist.core.config import RacLoraConfig
from raclora_dist.core.inject import TargetError, inject, match_targets, register_dispatcher, wrap_targets
from raclora_dist.core.landed import MergeResult, merge_into_weight
from raclora_dist.core.layer import (
    LayerSpec,
    MergeView,
    RacLoraLinear,
    RankError,
    lora_scale,
    resolve_side,
)
from raclora_dist.core.lowrank import append_to_chain, chain_of_links, chain_product, compress_lora, concat_links
from raclora_dist.core.sketch import sample_sketch, sketch_seed, tensor_fingerprint

__all__ = [
    "ChainState", "Comm", "DenseAccess", "FactorAccess", "LayerSpec", "LinkRecord", "LocalComm", "MergeResult", "MergeView",
    "NonFiniteFactorError", "RacLoraChain",
    "RacLoraConfig", "RacLoraLinear", "RankError", "SketchMismatchError", "TargetError",
    "append_to_chain", "chain_of_links", "chain_product", "compress_lora", "concat_links",
    "inject", "link_factors", "lora_scale", "match_targets",
    "merge_into_weight", "register_dispatcher", "replay_layer", "resolve_side", "sample_sketch", "sketch_seed",
    "tensor_fingerprint", "wrap_targets",
]
