"""``raclora validate``'s per-rank memory estimate against what a real model holds."""

from __future__ import annotations

import re

import torch

from raclora_dist.config import build_config
from raclora_dist.model.session import build_session, plan_run
from tests.helpers import TINY_MODEL, tiny_config


def _config(small_data, tmp_path, **sections):
    data = tiny_config(small_data, tmp_path / "run", **sections)
    data["data"]["seq_len"] = 64
    return build_config(data)


def _saved_bytes(model, tokens) -> int:
    """What autograd keeps from one real forward (storages, each once; weights left out)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens)
    return sum(saved.values())


def test_estimate_counts_the_real_models_weights_chain_and_activations(small_data, tmp_path):
    cfg = _config(small_data, tmp_path)
    n, est = plan_run(cfg)
    session = build_session(cfg)
    session.chain.start_link(0)
    layers = list(session.layers.values())
    assert n == len(layers)
    chain_ids = {id(t) for layer in layers for t in [*layer._parameters.values(), *layer._buffers.values()] if t is not None}
    chain = sum(t.nbytes for layer in layers for t in [*layer._parameters.values(), *layer._buffers.values()] if t is not None)
    base = {id(t): t for t in [*session.model.parameters(), *session.model.buffers()] if id(t) not in chain_ids}
    assert est.rows["base weights"] == sum(t.nbytes for t in base.values())
    assert est.params == sum(p.numel() for p in base.values() if isinstance(p, torch.nn.Parameter))
    assert est.rows["chain"] == chain
    factors = sum(layer.factor.nbytes for layer in layers)
    assert est.rows["gradients"] == factors and est.rows["optimizer state"] == 2 * factors  # AdamW
    real = _saved_bytes(session.model, torch.randint(0, 256, (cfg.train.batch_size, cfg.data.seq_len)))
    assert 0.8 * real < est.rows["activations"] < 1.25 * real, (est.rows["activations"], real)


def test_sharding_checkpointing_and_4bit_shrink_the_estimate_as_they_should(small_data, tmp_path):
    _, single = plan_run(_config(small_data, tmp_path))
    _, fsdp = plan_run(_config(small_data, tmp_path, distributed={"strategy": "fsdp2", "workers": 2,
                                                                  "fsdp_unit": "block"}))
    _, zero2 = plan_run(_config(small_data, tmp_path, distributed={"strategy": "deepspeed", "workers": 2}))
    deep = {**TINY_MODEL, "num_hidden_layers": 8}
    _, plain8 = plan_run(_config(small_data, tmp_path, model={"config": deep}))
    _, ckpt8 = plan_run(_config(small_data, tmp_path, model={"config": deep}, train={"activation_checkpointing": True}))
    _, nf4 = plan_run(_config(small_data, tmp_path, model={"quantization": "nf4"}))
    w = single.rows["base weights"]
    # TINY_MODEL: per block 9,216 projection weights (q 32x32, k, v 32x16, o 32x32, three 32x64
    # MLP matrices) and 64 norm weights, all fp32
    proj, block = 9216, 4 * (9216 + 64)
    assert fsdp.rows["base weights"] == w // 2 + block  # a half, plus one block gathered in flight
    assert zero2.rows["base weights"] == w and zero2.rows["optimizer state"] == single.rows["optimizer state"] / 2
    # per rank, a 2-worker run's micro-batch is half the batch
    assert fsdp.rows["activations"] < 0.6 * single.rows["activations"]
    # 8 blocks: each keeps one hidden state, one block is recomputed at a time
    assert ckpt8.rows["activations"] < 0.5 * plain8.rows["activations"]
    # 4-bit: the projections of both blocks at about half a byte per weight instead of 4
    assert w - 2 * proj * 4 + 2 * proj * 0.5 < nf4.rows["base weights"] < w - 2 * proj * 4 + 2 * proj * 0.6
    assert "master weights" not in nf4.rows
    # HSDP, 2 replicas x 2: each rank holds what a 2-worker full shard holds, at a quarter batch
    _, hsdp = plan_run(_config(small_data, tmp_path, distributed={"strategy": "fsdp2", "workers": 4, "replicas": 2,
                                                                  "fsdp_unit": "block"}, train={"batch_size": 4}))
    assert hsdp.rows["base weights"] == fsdp.rows["base weights"] and hsdp.rows["chain"] == fsdp.rows["chain"]
    assert hsdp.rows["activations"] < 0.6 * fsdp.rows["activations"]
    # link-sync over FSDP2, 2 groups x 2: each group shards over its own 2 ranks, as the engine
    # declares (the estimate once divided by all 4 workers)
    _, groups = plan_run(_config(small_data, tmp_path, distributed={"strategy": "fsdp2", "workers": 4, "sync": "link",
                                                                    "sync_groups": 2, "fsdp_unit": "block"},
                                 train={"batch_size": 4}))
    assert groups.rows["base weights"] == fsdp.rows["base weights"] and groups.rows["chain"] == fsdp.rows["chain"]
    assert groups.rows["optimizer state"] == fsdp.rows["optimizer state"]


def test_the_unit_in_flight_follows_fsdp_unit_and_the_vocabulary_split(small_data, tmp_path):
    """FSDP2 gathers one unit whole while it computes: a decoder block, its largest sublayer
    (attention or MLP) or its largest linear layer (``fsdp_unit``); the embedding and head only when they are not split by
    vocabulary rows."""
    fsdp = {"strategy": "fsdp2", "workers": 2}
    _, single = plan_run(_config(small_data, tmp_path))
    plans = {unit: plan_run(_config(small_data, tmp_path, distributed={**fsdp, "fsdp_unit": unit}))[1]
             for unit in ("auto", "block", "sublayer", "linear")}
    _, whole = plan_run(_config(small_data, tmp_path, distributed={**fsdp, "fsdp_unit": "linear",
                                                                   "vocab_parallel": False}))
    w = single.rows["base weights"]
    mlp = 32 * 64 * 4  # TINY_MODEL's largest linear layer, fp32
    block = 4 * (9216 + 64)  # its projections and norms
    embedding = 260 * 32 * 4  # TINY_MODEL's 260 rows of 32, fp32 (the head is as large)
    assert plans["block"].rows["base weights"] == w // 2 + block
    assert plans["sublayer"].rows["base weights"] == w // 2 + 3 * mlp  # the MLP: gate, up, down
    assert "one sublayer gathered" in plans["sublayer"].notes["base weights"]
    assert plans["linear"].rows["base weights"] == w // 2 + mlp
    assert "one linear layer gathered" in plans["linear"].notes["base weights"]
    assert plans["auto"].rows == plans["block"].rows  # a toy's 37 KiB blocks stay whole on any device
    assert whole.rows["base weights"] == w // 2 + embedding
    assert "the embedding gathered" in whole.notes["base weights"]


def test_deepspeed_offload_is_noted_where_it_moves_memory(small_data, tmp_path):
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    _, est = plan_run(_config(small_data, tmp_path, distributed={"strategy": "deepspeed", "workers": 2,
                                                                 "deepspeed": {"zero_optimization": zero}}))
    _, kept = plan_run(_config(small_data, tmp_path, distributed={"strategy": "deepspeed", "workers": 2,
                                                                  "deepspeed": {"zero_optimization": {"stage": 3}}}))
    for row in ("base weights", "gradients", "optimizer state"):
        assert est.notes[row].endswith("in CPU memory") and "CPU" not in kept.notes.get(row, ""), row


def test_the_merged_chain_at_the_last_link_follows_the_budget_and_warns_when_it_outgrows_the_base(small_data, tmp_path):
    many = {"links": 40, "merge_mode": "factored"}
    _, capped = plan_run(_config(small_data, tmp_path, raclora={**many, "chain_budget": 0.3}))
    _, exact = plan_run(_config(small_data, tmp_path, raclora={**many, "chain_budget": None}))
    _, into = plan_run(_config(small_data, tmp_path, raclora={"links": 40, "merge_mode": "into_base"}))
    assert "raclora.chain_budget 0.3" in capped.chain_lines[0] and "the exact chain would hold" in capped.chain_lines[1]
    assert exact.rows["chain"] > 4 * capped.rows["chain"]  # 40 links x r 2 up to min(m, n) vs 3-6 columns
    assert not capped.warnings
    assert exact.warnings and "% of the base weights" in exact.warnings[0]  # the exact chain outgrows the base
    assert "no chain held" in into.chain_lines[0] and not into.warnings
    # the default also caps each layer at chain_links (3) links' rank, and says so with its share
    _, default = plan_run(_config(small_data, tmp_path, raclora={**many, "rank": 2, "chain_budget": 0.9,
                                                                 "chain_links": 3}))
    assert "raclora.chain_budget 0.9, raclora.chain_links 3" in default.chain_lines[0]
    assert "6-6 columns per layer" in default.chain_lines[0]  # 3 x r 2, under the 14-19 that 0.9 allows
    assert re.search(r"\(\d+\.\d % of the base weights\)", default.chain_lines[0])


def test_an_8b_nf4_chain_of_100_links_stays_under_a_tenth_of_its_base_by_default(small_data, tmp_path):
    """Issue #27's target through ``raclora validate``'s estimate: Llama-3-8B shapes, NF4 with bf16
    embeddings, r 16, 100 links, the default cap (chain_budget 0.1, chain_links 3): the merged
    chain holds 48 columns per layer in bf16 (chain_dtype auto), 240 MiB, and with the link in training
    (its factor and sketch) 400 MiB, both under 10 % of the 5.31 GiB base (in fp32: 480 and 640 MiB,
    the second 11.8 %; the budget alone: 1.30 GiB, 24 %)."""
    llama3_8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256}
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    data = tiny_config(small_data, tmp_path / "run", raclora={"rank": 16, "links": 100, "target_modules": seven})
    data["model"] = {**data["model"], "config": {**data["model"]["config"], **llama3_8b}, "dtype": "bfloat16",
                     "quantization": "nf4"}
    data["data"]["seq_len"] = 64
    _, est = plan_run(build_config(data))
    assert "48-48 columns per layer in bfloat16" in est.chain_lines[0] and "240.00 MiB per rank" in est.chain_lines[0]
    share = float(re.search(r"\((\d+\.\d) % of the base weights\)", est.chain_lines[0]).group(1))
    assert share < 10 and not est.warnings
    assert est.rows["chain"] == (240 + 160) * 2**20 and est.rows["chain"] < 0.10 * est.base_params_bytes
    data["raclora"] = {**data["raclora"], "chain_dtype": "float32"}
    _, fp32 = plan_run(build_config(data))
    assert "480.00 MiB per rank" in fp32.chain_lines[0] and "columns per layer in float32" in fp32.chain_lines[0]
    assert fp32.rows["chain"] > 0.10 * fp32.base_params_bytes
    data["raclora"] = {**data["raclora"], "chain_dtype": "auto"}
    data["raclora"] = {**data["raclora"], "chain_links": None}
    _, budget_alone = plan_run(build_config(data))
    assert "81-318 columns per layer" in budget_alone.chain_lines[0]
    assert "1.30 GiB per rank (24.4 % of the base weights)" in budget_alone.chain_lines[0]
