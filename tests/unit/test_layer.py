"""RacLoraLinear and the chain on tiny tensors: forward, zero-init, merge exactness, guard."""

import pytest
import torch
from torch import nn

from raclora_dist.core import (
    LocalComm,
    NonFiniteFactorError,
    RacLoraChain,
    RacLoraConfig,
    RacLoraLinear,
    SketchMismatchError,
    inject,
    link_factors,
    lora_scale,
    resolve_side,
)
from raclora_dist.core.outer import OuterStep


def make(side="right", mode="into_base", rank=2, m=6, n=10, cap=None, links=4, budget=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(n, m))
    cfg = RacLoraConfig(rank=rank, alpha=3.0, target_modules=["lin"], sketch_side=side,
                        merge_mode=mode, links=links, max_chain_rank=cap, chain_budget=budget, **kw)
    layers = inject(model, cfg)
    return model, RacLoraChain(layers, cfg.on_nonfinite), layers["lin"]


def perturb(layer):
    with torch.no_grad():
        layer.factor.normal_()


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_equals_dense_formula(side):
    model, chain, layer = make(side)
    chain.start_link(0)
    perturb(layer)
    x = torch.randn(3, 5, 10)
    W = layer.base_layer.weight + layer.scale * layer.lora_B @ layer.lora_A
    assert torch.allclose(model(x), x @ W.T + layer.base_layer.bias, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["into_base", "factored"])
def test_output_unchanged_at_the_start_of_every_link(side, mode):
    model, chain, layer = make(side, mode)
    x = torch.randn(7, 10)
    chain.start_link(0)
    for link in range(1, 5):
        perturb(layer)
        chain.end_link()
        before = model(x)
        chain.start_link(link)
        assert torch.count_nonzero(layer.factor) == 0
        assert torch.allclose(model(x), before, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["into_base", "factored"])
def test_merge_is_exact(side, mode):
    model, chain, layer = make(side, mode)
    W0, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    x = torch.randn(7, 10)
    updates = []
    for link in range(4):
        chain.start_link(link)
        perturb(layer)
        updates.append(layer.scale * layer.lora_B.detach() @ layer.lora_A.detach())
        chain.end_link()
    chain.start_link(4)
    expected = x @ (W0 + sum(updates)).T + b
    assert torch.allclose(model(x), expected, atol=1e-5)
    if mode == "factored":
        # 4 links x rank 2 = 8 columns exceed min(m, n) = 6: recompressed to 6, losslessly
        # (the output above is still exact)
        assert torch.equal(layer.base_layer.weight, W0) and layer.chain_rank == 6
    # the record rebuilds the same updates from (seed, link, name)
    rebuilt = [layer.scale * B @ A for B, A in link_factors(layer.spec, chain.state)]
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(updates, rebuilt, strict=False))


def test_factored_cap_recompresses_to_the_best_approximation():
    _model, chain, layer = make("right", "factored", rank=2, cap=4, links=4)
    total = torch.zeros(6, 10)
    for link in range(3):
        chain.start_link(link)
        perturb(layer)
        total += layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
        chain.end_link()
    assert layer.chain_rank == 4
    kept = layer.chain_B[:, :4] @ layer.chain_A[:4]
    U, S, Vh = torch.linalg.svd(total)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.allclose(kept, best, atol=1e-4)


def test_a_bf16_chain_holds_the_fp32_chain_rounded():
    """chain_dtype bfloat16 on an fp32 base: appended links are the fp32 chain's values rounded to
    bf16; past the cap, the recompressed chain is the fp32 one's within bf16 rounding."""
    fp32, bf16 = make("right", "factored", cap=4, links=4), make("right", "factored", cap=4, links=4,
                                                                   chain_dtype="bfloat16")
    assert fp32[2].chain_A.dtype == torch.float32 and bf16[2].chain_A.dtype == torch.bfloat16
    for link in range(2):  # appended: the link's factors rounded
        for _, chain, layer in (fp32, bf16):
            chain.start_link(link)
            torch.manual_seed(link)
            perturb(layer)
            chain.end_link()
        assert torch.equal(bf16[2].chain_A, fp32[2].chain_A.bfloat16())
    for _, chain, layer in (fp32, bf16):  # past the cap: recompressed from the (rounded) chain in fp32
        chain.start_link(2)
        torch.manual_seed(2)
        perturb(layer)
        chain.end_link()
    want = fp32[2].chain_B @ fp32[2].chain_A
    got = bf16[2].chain_B.float() @ bf16[2].chain_A.float()
    assert 0 < (got - want).norm() < 1e-2 * want.norm()


def test_the_chain_product_keeps_the_stored_chain_for_the_backward_not_a_cast_copy():
    """A bf16 chain applied to fp32 activations: the gradient is the fp32 product's, and what the
    graph keeps for the backward is the bf16 chain itself (autograd's own casts would keep an
    fp32 copy of the whole chain per layer until the backward)."""
    from raclora_dist.core import chain_product

    torch.manual_seed(0)
    A, B = torch.randn(4, 10).bfloat16(), torch.randn(6, 4).bfloat16()
    x = torch.randn(3, 10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = chain_product(x, A, B)
    assert y.dtype == torch.float32 and {t.dtype for t in saved} == {torch.bfloat16}
    assert {t.data_ptr() for t in saved} == {A.data_ptr(), B.data_ptr()}
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_()
    want = (x2 @ A.float().T) @ B.float().T
    (g2,) = torch.autograd.grad(want.square().sum(), x2)
    assert torch.allclose(y, want, atol=1e-5) and torch.allclose(g, g2, atol=1e-4)


def test_nonfinite_factor_is_never_merged():
    _model, chain, layer = make("right")
    chain.start_link(0)
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.factor[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        layer.merge()
    rec = chain.end_link()
    assert not rec.merged and chain.state.merged == [] and chain.state.skipped == [0]
    assert torch.equal(layer.base_layer.weight, W0)


def test_nonfinite_stop_policy_raises():
    _model, chain, layer = make("right", on_nonfinite="stop")
    chain.start_link(0)
    with torch.no_grad():
        layer.factor[0, 0] = float("inf")
    with pytest.raises(NonFiniteFactorError):
        chain.end_link()


class SkewedComm(LocalComm):
    """Reports another rank's different fingerprint for module index 0."""

    def all_reduce_max(self, t):
        t = t.clone()
        t[0] += 1
        return t


def test_fingerprint_mismatch_names_the_module():
    _model, chain, _layer = make("right")
    with pytest.raises(SketchMismatchError, match="'lin'"):
        chain.start_link(0, SkewedComm())


def test_sketch_is_a_buffer_and_only_the_factor_trains():
    model, chain, layer = make("right")
    chain.start_link(0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lin.factor"]
    assert "lin.sketch" not in model.state_dict()  # regenerated, never stored
    assert "sketch" in dict(layer.named_buffers())
    model(torch.randn(2, 10)).sum().backward()
    assert layer.factor.grad is not None and layer.base_layer.weight.grad is None


def test_side_resolution_and_scales():
    assert resolve_side("auto", 64, 784) == "left"   # sketch the smaller (out) side
    assert resolve_side("auto", 784, 64) == "right"
    assert resolve_side("auto", 32, 32) == "right"  # tie
    assert lora_scale(16, 4, False) == 4 and lora_scale(16, 4, True) == 8
    with pytest.raises(ValueError, match="exceeds the sketched dimension"):
        RacLoraLinear(nn.Linear(3, 5), "x", rank=4, alpha=1, side="right")


def test_link_sync_merges_the_averaged_factor_times_the_outer_lr():
    """``end_link(average=True, outer=OuterStep(x))`` in one process: the mean over one rank is the
    factor itself, scaled by x before the merge, and the record keeps what was merged."""
    _, chain, layer = make("right", "into_base")
    _, ref_chain, ref = make("right", "into_base")
    for c in (chain, ref_chain):
        c.start_link(0)
    perturb(layer)
    with torch.no_grad():
        ref.factor.copy_(1.5 * layer.factor)
    chain.end_link(LocalComm(), average=True, outer=OuterStep(1.5))
    ref_chain.end_link()
    assert torch.allclose(layer.base_layer.weight, ref.base_layer.weight, atol=1e-6)
    assert torch.equal(chain.state.factors[0]["lin"], ref_chain.state.factors[0]["lin"])


def test_a_bf16_link_sync_payload_averages_the_bf16_factor_and_merges_it_in_fp32():
    """``end_link(average=..., payload=bfloat16)`` (``distributed.link_sync_dtype``): the factor
    travels rounded to bf16 (one process: the mean is itself), the record and the merge hold
    exactly that rounding, and fp32 keeps the factor as trained."""
    for payload in (torch.float32, torch.bfloat16):
        _, chain, layer = make("right")
        chain.start_link(0)
        perturb(layer)
        trained = layer.factor.detach().clone()
        W0 = layer.base_layer.weight.detach().clone()
        chain.end_link(LocalComm(), average=True, payload=payload)
        sent = trained.to(payload).float()
        assert torch.equal(chain.state.factors[0]["lin"], sent)
        assert (payload == torch.float32) == torch.equal(sent, trained)
        B, A = (sent, layer.sketch) if layer.side == "right" else (layer.sketch, sent)
        torch.testing.assert_close(layer.base_layer.weight, W0 + layer.scale * B @ A, rtol=1e-6, atol=1e-6)


def test_the_outer_step_is_the_scaled_mean_once_and_moves_its_anchor_over_rounds():
    """core/outer.py: one round from a zero anchor is ``lr * mean`` (today's link_outer_lr);
    a later round moves the anchor ``lr`` times the mean's move from it; reset forgets it."""
    from raclora_dist.core.outer import OuterStep

    step = OuterStep(lr=1.5)
    f = {"w": torch.zeros(3)}
    step.apply(f, {"w": torch.tensor([1.0, -2.0, 0.5])})
    assert torch.equal(f["w"], torch.tensor([1.5, -3.0, 0.75]))
    step.apply(f, {"w": torch.tensor([2.5, -3.0, 0.75])})  # the groups moved on from the anchor
    assert torch.equal(f["w"], torch.tensor([3.0, -3.0, 0.75]))
    step.reset()
    assert not step.anchor


@pytest.mark.parametrize("mode", ["into_base", "factored"])
def test_the_chain_calls_after_merge_once_per_merged_layer(mode):
    """A sharded CPU run trims the C heap there (model.session sets it): once per layer's merge."""
    _, chain, layer = make(mode=mode)
    calls = []
    chain.after_merge = lambda: calls.append(layer.factor.abs().sum().item())
    chain.start_link(0)
    perturb(layer)
    chain.end_link()
    assert calls == [0.0]  # after the merge consumed (zeroed) the factor


def test_a_merge_in_row_blocks_equals_one_block(monkeypatch):
    """core.landed.block_rows bounds a merge's temporaries; the weight and the landed statistics
    do not depend on the block beyond fp32 rounding (here one row at a time against the whole
    weight; a replay uses the same blocks as training, so resumes stay bitwise)."""
    from raclora_dist.core import landed

    W, B, A = torch.randn(6, 10), torch.randn(6, 2), torch.randn(2, 10)
    whole, rows = W.clone(), W.clone()
    once = landed.merge_rows_into_weight(whole, B, A, 0.5, chunk_rows=6)
    monkeypatch.setattr(landed, "BLOCK_ELEMENTS", 10)
    assert landed.block_rows(10) == 1
    blocked = landed.merge_rows_into_weight(rows, B, A, 0.5)
    assert torch.allclose(whole, rows, rtol=1e-6, atol=1e-6) and torch.allclose(once, blocked, rtol=1e-5)
