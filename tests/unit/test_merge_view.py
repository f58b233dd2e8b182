"""The single merge entry point, ``RacLoraLinear.merge_link(factor, view)``: every merge mode on
every view an engine can hand over (the whole dense weight, a rank's row chunk, the whole
packed 4-bit codes, a gathered chain) gives what the unsharded merge gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raclora_dist.core import RacLoraConfig, inject
from raclora_dist.core.layer import MergeView
from raclora_dist.quant.bnb import quantize_model
from raclora_dist.quant.config import QuantizationConfig


def wrapped(mode: str = "into_base", side: str = "right", quant: bool = False, **raclora):
    """One wrapped (m=12, n=16) layer at link 0, with a random trained factor."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(64 if quant else 16, 12 if not quant else 48))
    if quant:
        quantize_model(model, QuantizationConfig(method="nf4"), "uint8", keep_source=True)
    cfg = RacLoraConfig(rank=3, alpha=6, target_modules=["lin"], sketch_side=side, merge_mode=mode,
                        max_chain_rank=8, **raclora)
    layer = inject(model, cfg)["lin"]
    layer.resample(0)
    with torch.no_grad():
        layer.factor.normal_()
    return layer


@pytest.mark.parametrize("side", ["left", "right"])
def test_row_chunks_merge_to_the_whole_layer_and_their_landed_statistics_add_up(side):
    whole, sharded = wrapped(side=side), wrapped(side=side)
    factor = sharded.factor.detach().clone()
    expected = whole.merge()
    W = sharded.base_layer.weight.data
    # Three "ranks" own rows 0:5, 5:10 and 10:12 (torch.chunk's ceil-sized chunks), and a
    # fourth owns none, as with a small layer on many ranks.
    landed, norms = torch.zeros(3, dtype=torch.float64), set()
    for start, stop in [(0, 5), (5, 10), (10, 12), (12, 12)]:
        res = sharded.merge_link(factor, MergeView(weight=W[start:stop], row_start=start, rows_only=True))
        assert res.rows_only
        landed += res.landed
        norms.add(round(res.norm, 9))
    # Equal up to float rounding: a BLAS product over 5 rows may sum in another order than over 12.
    torch.testing.assert_close(W, whole.base_layer.weight.data, rtol=0, atol=1e-6)
    assert not torch.equal(W, wrapped(side=side).base_layer.weight.data)  # it did change
    assert torch.allclose(landed, expected.landed)
    assert norms == {round(expected.norm, 9)}  # the intended update's norm, on every rank


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_gathered_chain_copy_takes_the_same_merge_as_the_layer_in_place(side):
    in_place, gathered = wrapped("factored", side), wrapped("factored", side)
    assert in_place.merge_target == "chain"
    for link in range(3):  # 3 links x rank 3 > capacity 8: the last merge recompresses
        for layer in (in_place, gathered):
            layer.draw_sketch(link)
        factor = torch.randn(gathered.factor.shape, generator=torch.Generator().manual_seed(link))
        ref = in_place.merge(factor)
        cB, cA = gathered.chain_B.clone(), gathered.chain_A.clone()  # what an engine gathers
        res = gathered.merge_link(factor, MergeView(chain_B=cB, chain_A=cA))
        gathered.chain_B.copy_(cB)  # ... and writes back
        gathered.chain_A.copy_(cA)
        assert torch.equal(cB, in_place.chain_B) and torch.equal(cA, in_place.chain_A)
        assert res.discarded == ref.discarded and torch.allclose(res.landed, ref.landed)
    assert gathered.chain_rank == in_place.chain_rank == 8
    assert ref.discarded > 0


@pytest.mark.parametrize("master", ["none", "device"])
def test_packed_4bit_view_is_overwritten_with_the_new_codes(master):
    kw = {"master_weights": master} if master != "none" else {"allow_lossy_merge": True}
    in_place, viewed = wrapped("into_base", quant=True, **kw), wrapped("into_base", quant=True, **kw)
    assert viewed.merge_target == "packed"
    factor = viewed.factor.detach().clone()
    before = viewed.base_layer.weight.data.clone()
    ref = in_place.merge(factor)
    gathered = before.clone()  # an engine's gathered copy of the codes
    res = viewed.merge_link(factor, MergeView(weight=gathered))
    assert torch.equal(viewed.base_layer.weight.data, before)  # the engine writes back, not the layer
    assert torch.equal(gathered, in_place.base_layer.weight.data)
    assert not torch.equal(gathered, before)
    assert torch.allclose(res.landed, ref.landed) and not res.rows_only


def test_merge_targets_follow_the_mode_and_the_base():
    assert wrapped("into_base").merge_target == "rows"
    assert wrapped("factored").merge_target == "chain"
    assert wrapped("into_base", quant=True, master_weights="device").merge_target == "packed"
    assert wrapped("factored", quant=True).merge_target == "chain"


def test_a_non_finite_factor_leaves_every_view_untouched():
    layer = wrapped()
    factor = layer.factor.detach().clone()
    factor[0, 0] = float("nan")
    view = MergeView(weight=layer.base_layer.weight.data.clone())
    before = copy.deepcopy(view.weight)
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer.merge_link(factor, view)
    assert torch.equal(view.weight, before)
