"""Sketch groups: q/k/v sharing one right sketch per link is RAC-LoRA on the fused matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from raclora_dist.core import RacLoraChain, RacLoraConfig, RacLoraLinear, inject, link_factors

N, MQ, MK = 12, 8, 4
KEY = "attn.q_proj+k_proj+v_proj"


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(N, MQ), nn.Linear(N, MK), nn.Linear(N, MK)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def grouped(**kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", Attn())
    cfg = RacLoraConfig(rank=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], links=3,
                        sketch_groups=[["q_proj", "k_proj", "v_proj"]], **kw)
    layers = inject(model, cfg)
    return model, RacLoraChain(layers), layers


def test_grouped_chain_equals_the_fused_matrix_chain():
    model, chain, layers = grouped()
    attn = model.attn
    fused_base = nn.Linear(N, MQ + 2 * MK)
    with torch.no_grad():
        fused_base.weight.copy_(torch.cat([layers[f"attn.{p}_proj"].base_layer.weight for p in "qkv"]))
        fused_base.bias.copy_(torch.cat([layers[f"attn.{p}_proj"].base_layer.bias for p in "qkv"]))
    W0_q = layers["attn.q_proj"].base_layer.weight.detach().clone()
    fused = RacLoraLinear(fused_base, KEY, rank=2, alpha=4, side="right")
    fused_chain = RacLoraChain({KEY: fused})
    opt = torch.optim.SGD(chain.trainable_parameters(), lr=0.1)
    fopt = torch.optim.SGD([fused.factor], lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for link in range(3):
        chain.start_link(link)
        fused_chain.start_link(link)
        # every member drew the fused layer's sketch
        assert all(torch.equal(layer.sketch, fused.sketch) for layer in layers.values())
        for _ in range(3):
            x, target = torch.randn(5, N, generator=gen), torch.randn(5, MQ + 2 * MK, generator=gen)
            for net, o in ((attn, opt), (fused, fopt)):
                o.zero_grad()
                ((net(x) - target) ** 2).mean().backward()
                o.step()
        chain.end_link()
        fused_chain.end_link()
    W = torch.cat([layers[f"attn.{p}_proj"].base_layer.weight for p in "qkv"])
    assert torch.allclose(W, fused_base.weight, atol=1e-6)
    x = torch.randn(7, N)
    assert torch.allclose(attn(x), fused(x), atol=1e-5)
    # the recorded factors rebuild the same links under the group's sketch key
    q = layers["attn.q_proj"]
    assert q.spec.key == KEY
    rebuilt = sum(q.scale * B @ A for B, A in link_factors(q.spec, chain.state))
    assert torch.allclose(rebuilt, q.base_layer.weight - W0_q, atol=1e-5)
    fused_rebuilt = sum(fused.scale * B @ A for B, A in link_factors(fused.spec, fused_chain.state))
    assert torch.allclose(rebuilt, fused_rebuilt[:MQ], atol=1e-5)


class CountMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.mm += 1
        return func(*args, **(kwargs or {}))


def test_the_input_projection_is_computed_once_per_group():
    model, chain, _ = grouped()
    chain.start_link(0)
    x = torch.randn(5, N)
    with CountMM() as shared:
        model(x)
    ungrouped = nn.Sequential()
    ungrouped.add_module("attn", Attn())
    c2 = RacLoraChain(inject(ungrouped, RacLoraConfig(rank=2, target_modules=["q_proj", "k_proj", "v_proj"],
                                                       sketch_side="right")))
    c2.start_link(0)
    with CountMM() as separate:
        ungrouped(x)
    assert (separate.mm, shared.mm) == (3, 1)  # x A^T: once per member vs once per group


def test_group_members_are_right_sketched_and_left_is_refused():
    _, _, layers = grouped()  # sketch_side auto would pick left for k/v (out 4 < in 12)
    assert {layer.side for layer in layers.values()} == {"right"}
    assert len({layer.fingerprint() for layer in layers.values()}) == 1
    with pytest.raises(ValueError, match="sketch_side right or auto"):
        RacLoraConfig(sketch_groups=[["q_proj", "k_proj"]], sketch_side="left")
