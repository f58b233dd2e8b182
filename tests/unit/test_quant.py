"""4-bit bases with real bitsandbytes (CPU): the wrapper, the merge modes, landed fractions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raclora_dist.config import ConfigError, build_config
from raclora_dist.core import RacLoraChain, RacLoraConfig, RacLoraLinear, inject, link_factors
from raclora_dist.quant.bnb import (
    Linear4bitRacLora,
    dequantize,
    quantize_model,
    quantize_weight,
    stochastic_round,
)
from raclora_dist.quant.config import QuantizationConfig


def quantized_model(method="nf4", keep_source=False, seed=0, n=256):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 128))
    names = quantize_model(model, QuantizationConfig(method=method), "uint8", keep_source=keep_source)
    assert names == ["0", "2"]
    return model


def run_links(model, links, factor_std, **raclora):
    """Injects, then merges ``links`` links of random factors; returns (layers, chain, records)."""
    cfg = RacLoraConfig(rank=4, alpha=8, target_modules=["0", "2"], links=links, **{"chain_budget": None, **raclora})
    layers = inject(model, cfg)
    chain = RacLoraChain(layers)
    gen = torch.Generator().manual_seed(1)
    records = []
    for link in range(links):
        chain.start_link(link)
        for layer in layers.values():
            with torch.no_grad():
                layer.factor.copy_(torch.randn(layer.factor.shape, generator=gen) * factor_std)
        records.append(chain.end_link())
    return layers, chain, records


def test_dispatch_wraps_linear4bit_and_auto_merge_mode_follows_the_base():
    model = quantized_model()
    layers = inject(model, RacLoraConfig(rank=4, target_modules=["0", "2"]))
    assert all(type(layer) is Linear4bitRacLora for layer in layers.values())
    assert all(layer.merge_mode == "factored" for layer in layers.values())
    dense = inject(nn.Sequential(nn.Linear(8, 8)), RacLoraConfig(rank=2, target_modules=["0"]))
    assert type(dense["0"]) is RacLoraLinear and dense["0"].merge_mode == "into_base"
    assert not dense["0"].stochastic_rounding and dense["0"].master is None  # fp32 merges exactly
    # bf16: into the base, rounded stochastically (or from a master copy); factored only when
    # both are switched off, since rounding to nearest would drop small links
    bf16 = inject(nn.Sequential(nn.Linear(8, 8).bfloat16()), RacLoraConfig(rank=2, target_modules=["0"]))
    assert bf16["0"].merge_mode == "into_base" and bf16["0"].stochastic_rounding and bf16["0"].master is None
    bf16 = inject(nn.Sequential(nn.Linear(8, 8).bfloat16()), RacLoraConfig(rank=2, target_modules=["0"],
                                                                            master_weights="cpu"))
    assert bf16["0"].merge_mode == "into_base" and not bf16["0"].stochastic_rounding and bf16["0"].master is not None
    bf16 = inject(nn.Sequential(nn.Linear(8, 8).bfloat16()), RacLoraConfig(rank=2, target_modules=["0"],
                                                                            stochastic_rounding=False))
    assert bf16["0"].merge_mode == "factored"
    assert not layers["0"].stochastic_rounding  # 4-bit: factored, nothing rounds


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("chain_dtype", ["float32", "auto"])
def test_factored_on_4bit_equals_dequantized_base_plus_link_updates(method, chain_dtype):
    """An fp32 chain applies base + sum of the links exactly; the default (auto: bf16 on a 4-bit
    base) within bf16's rounding of the chain, and its landed statistics say so."""
    model = quantized_model(method)
    q0 = {n: (m.weight.data.clone(), dequantize(m.weight.data, m.quant_state)) for n, m in
          [("0", model[0]), ("2", model[2])]}
    layers, chain, records = run_links(model, links=5, factor_std=0.05, chain_dtype=chain_dtype)
    exact = chain_dtype == "float32"
    assert {layer.chain_A.dtype for layer in layers.values()} == {torch.float32 if exact else torch.bfloat16}
    x = torch.randn(6, 256)
    with torch.no_grad():
        h = x
        for name in ("0", "2"):
            layer = layers[name]
            assert torch.equal(layer.base_layer.weight.data, q0[name][0])  # codes untouched
            W = q0[name][1] + sum(layer.scale * B @ A for B, A in link_factors(layer.spec, chain.state))
            base = h @ q0[name][1].T + layer.base_layer.bias
            h = h @ W.T + layer.base_layer.bias
            if name == "0":
                got = layer(x)
                if exact:
                    assert torch.allclose(got, h, atol=1e-5)
                else:  # the chain's contribution to within bf16's rounding of its factors (2^-8)
                    assert 0 < (got - h).norm() < 4e-3 * (h - base).norm()
                h = torch.relu(h)
        if exact:
            assert torch.allclose(model(x), h, atol=1e-5)
    tol = 1e-5 if exact else 4e-3
    assert all(r.landed_fraction == pytest.approx(1, abs=tol) for r in records)
    assert all(r.landed_cosine == pytest.approx(1, abs=tol) for r in records)
    if not exact:
        assert any(r.landed_fraction != pytest.approx(1, abs=1e-6) for r in records)  # it really rounds


def test_landed_fraction_is_one_for_factored_and_master_and_low_in_place():
    """A small update (a fraction of a 4-bit grid step per element): in place it is mostly
    rounded back to the old codes; a master copy keeps it (unbiased: the projection of what
    landed onto the intended update is ~1, though each merge moves whole grid steps)."""
    small = 2e-3
    _, _, fact = run_links(quantized_model(), 3, small, merge_mode="factored", chain_dtype="float32")
    _, _, master = run_links(quantized_model(keep_source=True), 3, small, merge_mode="into_base", master_weights="cpu")
    _, _, inplace = run_links(quantized_model(), 3, small, merge_mode="into_base")
    _, _, rounded = run_links(quantized_model(), 3, small, merge_mode="into_base", stochastic_rounding=True)
    f = [r.landed_fraction for r in fact]
    m = [r.landed_fraction for r in master]
    i = [r.landed_fraction for r in inplace]
    s = [r.landed_fraction for r in rounded]
    assert f == pytest.approx([1, 1, 1], abs=1e-5)
    assert m == pytest.approx([1, 1, 1], abs=0.15)
    assert max(i) < 0.5
    assert s == pytest.approx([1, 1, 1], abs=0.15)  # unbiased, like the master copy
    assert all(r.landed_cosine < 0.8 for r in master)  # but not exact: whole grid steps move


def test_master_copy_keeps_small_updates_across_links():
    """After many small links the master-copy weight tracks base + sum of updates within the
    quantization error; in place it stays at the starting codes."""
    for mode, kw in [("master", {"master_weights": "device"}), ("in_place", {})]:
        model = quantized_model(keep_source=True)
        W_fp = model[0]._raclora_source.clone()
        layers, chain, _ = run_links(model, 12, 2e-3, merge_mode="into_base", **kw)
        layer = layers["0"]
        total = sum(layer.scale * B @ A for B, A in link_factors(layer.spec, chain.state))
        moved = layer.dense_base_weight() - dequantize(*quantize_weight(W_fp, "nf4", 64, True, torch.uint8))
        frac = float((moved * total).sum() / (total * total).sum())
        if mode == "master":
            assert frac == pytest.approx(1, abs=0.1)
        else:
            assert frac < 0.5


def test_into_base_merges_replay_bitwise():
    """A resumed run replays the recorded links onto a fresh quantized base: the codes must
    come out bitwise equal, including stochastic rounding (keyed by seed, link and name)."""
    for kw in [{"master_weights": "cpu"}, {"stochastic_rounding": True}, {}]:
        layers, chain, _ = run_links(quantized_model(keep_source=True), 3, 0.02, merge_mode="into_base", **kw)
        model2 = quantized_model(keep_source=True)
        cfg = RacLoraConfig(rank=4, alpha=8, target_modules=["0", "2"], links=3, merge_mode="into_base", **kw)
        chain2 = RacLoraChain(inject(model2, cfg))
        chain2.replay(chain.state)
        for name, layer in layers.items():
            assert torch.equal(layer.base_layer.weight.data, chain2.layers[name].base_layer.weight.data), (kw, name)
            assert torch.equal(layer.base_layer.quant_state.absmax, chain2.layers[name].base_layer.quant_state.absmax)


def test_stochastic_rounding_is_unbiased_and_lands_on_the_grid():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    packed, state = quantize_weight(W, "nf4", 64, False, torch.uint8)
    draws = torch.stack([stochastic_round(W, state.code, 64, torch.Generator().manual_seed(i)) for i in range(400)])
    nearest = dequantize(packed, state)
    # unbiased: the mean of the draws is much closer to W than round-to-nearest is
    assert (draws.mean(0) - W).abs().mean() < 0.2 * (nearest - W).abs().mean()
    one = draws[0]
    p2, s2 = quantize_weight(one, "nf4", 64, False, torch.uint8)
    assert torch.allclose(dequantize(p2, s2), one, atol=1e-6)  # on the grid: quantizing is exact


def test_masters_are_only_for_rounding_bases_and_into_base():
    with pytest.raises(ValueError, match=r"apply to bf16, fp16 and 4-bit bases; this base is torch.float32"):
        inject(nn.Sequential(nn.Linear(8, 8)), RacLoraConfig(rank=2, target_modules=["0"], merge_mode="into_base",
                                                             master_weights="cpu"))
    with pytest.raises(ValueError, match="need merge_mode into_base"):
        RacLoraConfig(rank=2, master_weights="cpu", merge_mode="factored")
    base = {"model": {"config": {"model_type": "llama"}}, "data": {"path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"raclora.master_weights and raclora.stochastic_rounding apply to bases that "
                                          "round a merge"):
        build_config({**base, "raclora": {"merge_mode": "into_base", "master_weights": "cpu"}})
    with pytest.raises(ConfigError, match=r"model.quantization.method: .*'nf4'.*'int3'"):
        build_config({**base, "model": {**base["model"], "quantization": "int3"}})
    cfg = build_config({**base, "model": {**base["model"], "quantization": "nf4"}})
    assert cfg.model.quantization.method == "nf4" and cfg.model.quantization.double_quant
    assert cfg.model.quantization.storage == "uint8"
    with pytest.raises(ConfigError, match=r"storage_dtype='float32' with distributed.mixed_precision=bf16"):
        build_config({**base, "model": {**base["model"], "quantization": {"method": "nf4", "storage_dtype": "float32"}},
                      "distributed": {"mixed_precision": "bf16"}})


def test_dotted_override_merges_into_the_quantization_shorthand(tmp_path):
    from raclora_dist.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {config: {model_type: llama}, quantization: nf4}\ndata: {path: x.jsonl}\n")
    cfg = load_config(path, ["model.quantization.double_quant=false"])
    assert cfg.model.quantization.method == "nf4" and not cfg.model.quantization.double_quant
