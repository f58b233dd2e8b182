"""Injection into a real transformers model built from a config."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from raclora_dist.core import RacLoraChain, RacLoraConfig, RacLoraLinear, RankError, TargetError, inject
from tests.helpers import TINY_MODEL


def tiny_llama():
    kw = dict(TINY_MODEL)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


def test_list_targets_match_suffixes_and_freeze_the_rest():
    model = tiny_llama()
    layers = inject(model, RacLoraConfig(rank=2, target_modules=["q_proj", "down_proj"]))
    assert list(layers) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.factor" for n in layers]
    # auto side: q_proj (32 -> 32) ties -> right; down_proj (64 -> 32) sketches the smaller out side
    assert layers["model.layers.0.self_attn.q_proj"].side == "right"
    assert layers["model.layers.0.mlp.down_proj"].side == "left"


def test_regex_targets_match_whole_names():
    model = tiny_llama()
    layers = inject(model, RacLoraConfig(rank=2, target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"))
    assert list(layers) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert isinstance(model.model.layers[1].self_attn.k_proj, RacLoraLinear)


def test_unmatched_pattern_lists_candidates():
    with pytest.raises(TargetError) as e:
        inject(tiny_llama(), RacLoraConfig(rank=2, target_modules=["q_proj", "query"]))
    msg = str(e.value)
    assert "'query' matched no module" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg


def test_rank_larger_than_a_layer_names_the_module():
    # k_proj is 32 -> 16 (2 kv heads of 8): a left-sketched rank 20 cannot fit 16 rows
    with pytest.raises(RankError, match=r"raclora.rank=20: .*'model.layers.0.self_attn.k_proj'"):
        inject(tiny_llama(), RacLoraConfig(rank=20, target_modules=["k_proj"], sketch_side="left"))


def test_injected_model_is_unchanged_at_link_start():
    model = tiny_llama()
    x = torch.randint(0, 256, (2, 12))
    ref = model(input_ids=x).logits
    chain = RacLoraChain(inject(model, RacLoraConfig(rank=2)))
    chain.start_link(0)
    assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6)
