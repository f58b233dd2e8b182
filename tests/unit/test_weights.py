"""Streamed base loading (model/weights.py, model/session.py) in one process: a model made real
part by part from sharded safetensors equals transformers' own ``from_pretrained``; 4-bit on
load equals quantizing the whole model; config-built weights do not depend on load order;
activation checkpointing changes memory, not results."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from raclora_dist.config import ConfigError, build_config
from raclora_dist.core import RacLoraLinear
from raclora_dist.model.build import build_meta_model
from raclora_dist.model.session import build_session
from raclora_dist.model.weights import INDEX, InitFromConfig, SafetensorsFolder, state_shapes, write_safetensors
from tests.helpers import TINY_MODEL, captured_logs, tiny_config

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 33, 4, 250], [7, 7, 100, 3, 2, 90, 12, 8]])


def meta_model(cfg):
    return build_meta_model(cfg.model, 256)


def config(tmp_path, small_data, **model):
    data = tiny_config(small_data, tmp_path / "run")
    data["model"].update(model)
    if "name_or_path" in model:
        data["model"].pop("config")
    return build_config(data)


def save_pretrained_shards(tmp_path, tied=False, shard="20KB"):
    """A config-built model saved by transformers as a sharded folder (what users bring)."""
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(_hf_config(tied), dtype=torch.float32)
    folder = tmp_path / "pretrained"
    hf.save_pretrained(folder, max_shard_size=shard)
    return folder, hf


def _hf_config(tied):
    from transformers import AutoConfig

    kw = dict(TINY_MODEL)
    kw["tie_word_embeddings"] = tied
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def test_init_from_config_is_the_same_in_any_order_and_depends_on_the_seed(tmp_path, small_data):
    cfg = config(tmp_path, small_data)
    model = meta_model(cfg)
    keys = sorted(InitFromConfig(model, 0).keys())
    a, b, other = InitFromConfig(model, 0), InitFromConfig(model, 0), InitFromConfig(model, 1)
    forward = {k: a.get(k).clone() for k in keys}
    backward = {k: b.get(k).clone() for k in reversed(keys)}
    assert all(torch.equal(forward[k], backward[k]) for k in keys)
    weights = [k for k in keys if k.endswith("proj.weight")]
    assert weights and all(forward[k].std() > 0 for k in weights)
    assert not any(torch.equal(forward[k], other.get(k)) for k in weights)
    # Neighbouring layers are not copies of each other (each module has its own seed).
    assert not torch.equal(forward["model.layers.0.mlp.up_proj.weight"], forward["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("tied", [False, True])
def test_write_safetensors_loads_in_transformers_and_round_trips(tmp_path, tied):
    from transformers import AutoConfig

    hf_cfg = _hf_config(tied)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    source = InitFromConfig(meta, 7)
    folder = tmp_path / "written"
    files = write_safetensors(source, state_shapes(meta), folder, max_shard_bytes=30_000)
    assert len(files) > 2 and (folder / INDEX).is_file()
    hf_cfg.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for key, value in loaded.state_dict().items():
        if "rotary" in key:
            continue
        assert torch.equal(value, source.get(key)), key
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert AutoConfig.from_pretrained(folder).tie_word_embeddings == tied
    back = SafetensorsFolder(folder)
    assert back.keys() == set(state_shapes(meta))


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_session_computes_what_from_pretrained_computes(tmp_path, small_data, tied):
    folder, _ = save_pretrained_shards(tmp_path, tied=tied)
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) > 0
    cfg = config(tmp_path, small_data, name_or_path=str(folder))
    with captured_logs() as lines:
        session = build_session(cfg)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got = session.model(TOKENS).logits
        want = reference(TOKENS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(isinstance(layer, RacLoraLinear) for layer in session.layers.values())
    n_files = len(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    assert sum("loaded model-" in line for line in lines) == n_files  # one progress line per shard file
    if tied:
        assert session.model.lm_head.weight is session.model.model.embed_tokens.weight


def test_a_checkpoint_missing_a_tensor_is_a_config_error_naming_it(tmp_path, small_data):
    folder, hf = save_pretrained_shards(tmp_path, shard="1GB")
    from safetensors.torch import save_file

    state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    (folder / "model.safetensors").unlink()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config(tmp_path, small_data, name_or_path=str(folder))
    with pytest.raises(ConfigError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight"):
        build_session(cfg)


def test_a_folder_without_safetensors_is_a_config_error(tmp_path, small_data):
    folder, _ = save_pretrained_shards(tmp_path)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    cfg = config(tmp_path, small_data, name_or_path=str(folder))
    with pytest.raises(ConfigError, match=r"model.name_or_path"):
        build_session(cfg)


def test_4bit_on_load_equals_quantizing_the_whole_model(tmp_path, small_data):
    from raclora_dist.quant.bnb import quantize_model

    folder, _ = save_pretrained_shards(tmp_path)
    cfg = config(tmp_path, small_data, name_or_path=str(folder), quantization="nf4")
    session = build_session(cfg)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quantize_model(whole, cfg.model.quantization, cfg.model.quantization.storage)
    streamed = dict(session.model.named_modules())
    compared = 0
    for name, module in whole.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        layer = streamed[name]
        base = layer.base_layer if isinstance(layer, RacLoraLinear) else layer
        assert torch.equal(base.weight.data, module.weight.data), name
        assert torch.equal(base.weight.quant_state.absmax, module.weight.quant_state.absmax), name
        compared += 1
    assert compared == 2 * 7  # every projection of both blocks; lm_head is skipped
    with torch.no_grad():
        torch.testing.assert_close(session.model(TOKENS).logits, whole(TOKENS).logits, rtol=0, atol=1e-6)


def _loss_and_grads(session):
    session.chain.start_link(0)
    gen = torch.Generator().manual_seed(0)
    for layer in session.layers.values():  # a non-zero factor so that gradients reach everything
        with torch.no_grad():
            layer.factor.normal_(0, 0.05, generator=gen)
    session.model.train()
    saved = []  # bytes autograd keeps for the backward (outside the recomputed blocks)

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = session.model(TOKENS, labels=TOKENS)
    out.loss.backward()
    return out.loss.detach(), {n: layer.factor.grad.clone() for n, layer in session.layers.items()}, sum(saved)


@pytest.mark.parametrize("groups", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, small_data, groups):
    results = []
    for ckpt in (False, True):
        data = tiny_config(small_data, tmp_path / f"run{ckpt}")
        data["train"]["activation_checkpointing"] = ckpt
        data["model"]["config"]["attention_dropout"] = 0.0
        if groups:
            data["raclora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
            data["raclora"]["sketch_groups"] = [["q_proj", "k_proj", "v_proj"]]
        cfg = build_config(data)
        session = build_session(cfg)
        flag = getattr(type(session.model), "is_activation_checkpointing", None)
        assert (session.model.is_activation_checkpointing if flag else session.model.is_gradient_checkpointing) == ckpt
        results.append(_loss_and_grads(session))
    (loss0, g0, saved0), (loss1, g1, saved1) = results
    assert saved1 < saved0 / 2  # the blocks' activations were not kept
    assert torch.equal(loss0, loss1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8)
        assert g0[name].abs().sum() > 0
