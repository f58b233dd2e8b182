"""Merging into a bf16 base without rounding the links away: a fp32 master copy (whole, or in
row chunks as sharding engines hold it) and stochastic rounding (core/master.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raclora_dist.config import ConfigError, build_config
from raclora_dist.core import RacLoraConfig, inject
from raclora_dist.core.layer import MergeView
from raclora_dist.core.master import gather_rows, row_chunk, stochastic_round_rows
from tests.helpers import tiny_config

M, N, LINKS = 300, 512, 30


def bf16_layer(**raclora):
    """One bf16 (300, 512) layer, into_base, right-sketched at rank 4 (the same weights each call)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(N, M).to(torch.bfloat16))
    cfg = RacLoraConfig(rank=4, alpha=8, target_modules=["lin"], merge_mode="into_base", **raclora)
    return inject(model, cfg)["lin"]


def small_links(layer, links=LINKS):
    """Trained factors of a typical fine-tuning size: each link far below bf16's resolution of
    the weights (|s B A| ~ 1e-4 against |W| ~ 0.02, whose bf16 step is ~1e-4)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(layer.factor.shape, generator=g) * 1e-4 for _ in range(links)]


def merge_all(layer, factors):
    """Merges every link (in place); returns the exact fp32 sum of the intended updates (m, n)."""
    total = torch.zeros(M, N)
    for link, f in enumerate(factors):
        layer.resample(link)
        B, A = layer.factors_with(f)
        total += layer.scale * (B @ A)
        layer.merge(f.clone())
    return total


def test_master_copy_lands_every_link_with_one_rounding_of_the_sum():
    """bf16 weight = round(W0 + sum of links) to within one rounding, whatever the number of
    links; without the master most of each small link rounds away."""
    plain, master = bf16_layer(stochastic_rounding=False), bf16_layer(master_weights="cpu")
    W0 = plain.base_layer.weight.float().clone()
    factors = small_links(plain)
    total = merge_all(plain, factors)
    assert torch.equal(merge_all(master, factors), total)
    exact = W0 + total
    one_rounding = (exact - exact.to(torch.bfloat16).float()).norm()
    err_master = (master.base_layer.weight.float() - exact).norm()
    err_plain = (plain.base_layer.weight.float() - exact).norm()
    assert err_master <= 1.01 * one_rounding
    assert err_plain > 1.5 * err_master
    # The master itself holds the fp32 sum.
    torch.testing.assert_close(master.master, exact, rtol=0, atol=1e-6)
    d = master.base_layer.weight.float() - W0
    assert float((d * total).sum() / (total * total).sum()) == pytest.approx(1.0, abs=0.02)
    d = plain.base_layer.weight.float() - W0
    assert float((d * total).sum() / (total * total).sum()) < 0.7


def test_stochastic_rounding_is_unbiased_and_the_same_however_the_rows_are_split():
    x = torch.randn(600, 64) * 0.02
    kw = {"seed": 3, "link": 2, "name": "lin"}
    whole = stochastic_round_rows(x, torch.bfloat16, 0, **kw)
    parts = [stochastic_round_rows(x[a:b], torch.bfloat16, a, **kw) for a, b in [(0, 100), (100, 513), (513, 600)]]
    assert torch.equal(torch.cat(parts), whole)
    # every element rounded to one of its two bf16 neighbours ...
    nearest = x.to(torch.bfloat16)
    assert ((whole == nearest) | (torch.nextafter(nearest, whole) == whole)).all()
    assert not torch.equal(whole, nearest)
    # ... and on average to x itself: the mean of many keyed draws converges to x, while
    # round-to-nearest keeps its error.
    draws = torch.stack([stochastic_round_rows(x[:8], torch.bfloat16, 0, seed=s, link=0, name="lin").float()
                         for s in range(400)])
    bias_sr = (draws.mean(0) - x[:8]).abs().mean()
    bias_nearest = (nearest[:8].float() - x[:8]).abs().mean()
    assert bias_sr < 0.2 * bias_nearest


def test_stochastic_rounding_lands_small_links_on_average():
    """Also the default: into_base on a bf16 base rounds stochastically (merge_mode and
    stochastic_rounding auto)."""
    plain, sr = bf16_layer(stochastic_rounding=False), bf16_layer()
    assert sr.stochastic_rounding is True
    W0 = plain.base_layer.weight.float().clone()
    factors = small_links(plain)
    merge_all(plain, factors)
    total = merge_all(sr, factors)
    landed = lambda layer: float(((layer.base_layer.weight.float() - W0) * total).sum() / (total * total).sum())  # noqa: E731
    assert landed(sr) == pytest.approx(1.0, abs=0.1)
    assert landed(plain) < 0.7


@pytest.mark.parametrize("world", [2, 3])
def test_master_in_row_chunks_merges_as_the_whole_master(world):
    """Each "rank" holds its FSDP2 row chunk of the master and merges its rows with no gather;
    a ZeRO-3-like whole-weight view gathers the chunks. Both equal one process bitwise."""
    whole = bf16_layer(master_weights="cpu", stochastic_rounding=True)
    ranks = [bf16_layer(master_weights="cpu", stochastic_rounding=True) for _ in range(world)]
    gathered = bf16_layer(master_weights="cpu", stochastic_rounding=True)
    for r, layer in enumerate(ranks):
        layer.shard_master(r, world)
        lo, hi = layer.master_rows
        assert (lo, hi) == row_chunk(M, r, world) and layer.master.shape[0] == hi - lo
    gathered.shard_master(0, world)  # rank 0 of a gathered (ZeRO-3-like) merge

    def gather(local_flat, total):  # the engines' flat all-gather, over the row-chunk "ranks"
        parts = [torch.nn.functional.pad(layer.master.flatten(), (0, total // world - layer.master.numel()))
                 for layer in ranks]
        parts[0] = torch.nn.functional.pad(local_flat, (0, total // world - local_flat.numel()))
        return torch.cat(parts)

    for link, f in enumerate(small_links(whole, 5)):
        for layer in (whole, *ranks, gathered):
            layer.resample(link)
        whole.merge(f.clone())
        for r, layer in enumerate(ranks):
            lo, hi = row_chunk(M, r, world)
            layer.merge_link(f, MergeView(weight=layer.base_layer.weight.data[lo:hi], row_start=lo, rows_only=True))
        gathered.merge_link(f, MergeView(weight=gathered.base_layer.weight.data, gather=gather))
    stitched = torch.cat([layer.base_layer.weight.data[slice(*row_chunk(M, r, world))] for r, layer in enumerate(ranks)])
    assert torch.equal(stitched, whole.base_layer.weight.data)
    assert torch.equal(gathered.base_layer.weight.data, whole.base_layer.weight.data)
    assert torch.equal(gather_rows(ranks[0].master, M, world, gather), whole.master)


def test_a_rows_view_outside_the_held_master_without_a_gather_is_an_error():
    layer = bf16_layer(master_weights="cpu")
    layer.shard_master(1, 2)
    layer.resample(0)
    with pytest.raises(RuntimeError, match=r"holds 150..300 and the engine gave no gather"):
        layer.merge_link(small_links(layer, 1)[0], MergeView(weight=layer.base_layer.weight.data))


def test_master_and_rounding_options_name_the_base_they_need(small_data, tmp_path):
    def config(model=None, **raclora):
        return build_config(tiny_config(small_data, tmp_path / "r", model={"dtype": "float32", **(model or {})},
                                        raclora=raclora))

    cfg = config({"dtype": "bfloat16"}, merge_mode="into_base", master_weights="cpu", stochastic_rounding=True)
    assert cfg.raclora.master_weights == "cpu"
    with pytest.raises(ConfigError, match=r"model.dtype float32, which merges exactly"):
        config(merge_mode="into_base", master_weights="cpu")
    # auto is into_base on a bf16 base; factored refuses them, and so does a 4-bit base's auto (factored)
    assert config({"dtype": "bfloat16"}, master_weights="cpu").raclora.merge_mode == "auto"
    with pytest.raises(ConfigError, match="need merge_mode into_base"):
        config({"dtype": "bfloat16"}, stochastic_rounding=True, merge_mode="factored")
    with pytest.raises(ConfigError, match="on a 4-bit base, whose merge_mode auto is factored"):
        config({"quantization": "nf4"}, master_weights="cpu")
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(16, 12))
    with pytest.raises(ValueError, match=r"torch.float32, which merges exactly"):
        inject(model, RacLoraConfig(rank=2, target_modules=["lin"], merge_mode="into_base", master_weights="cpu"))


def test_auto_rounding_follows_a_base_an_engine_casts_after_wrapping():
    """DeepSpeed's bf16 casts the whole module after the layers are wrapped: a fp32 base (merged
    into_base, exactly) becomes a bf16 one, and auto then rounds its merges stochastically."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(N, M))
    layer = inject(model, RacLoraConfig(rank=4, alpha=8, target_modules=["lin"]))["lin"]
    assert layer.merge_mode == "into_base" and not layer.stochastic_rounding  # fp32: exact
    model.bfloat16()  # what the engine does
    assert layer.stochastic_rounding
    W0 = layer.base_layer.weight.float().clone()
    total = merge_all(layer, small_links(layer))
    d = layer.base_layer.weight.float() - W0
    assert float((d * total).sum() / (total * total).sum()) == pytest.approx(1.0, abs=0.1)
