"""One SGD step from zero with an orthogonal sketch and lr = gamma / s^2 is exactly the
projected gradient step -gamma * grad @ H_A (right) or -gamma * H_B @ grad (left)."""

import pytest
import torch
from torch import nn

from raclora_dist.core import RacLoraChain, RacLoraConfig, inject


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_sgd_step_is_the_projected_step(side):
    torch.manual_seed(0)
    m, n, gamma = 5, 9, 0.1
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(n, m, bias=False))
    model = model.double()
    X, Y = torch.randn(20, n, dtype=torch.float64), torch.randn(20, m, dtype=torch.float64)
    W0 = model.lin.weight.detach().clone().requires_grad_(True)
    loss = 0.5 * ((X @ W0.T - Y) ** 2).sum()
    (G,) = torch.autograd.grad(loss, W0)  # grad f(W), shape (m, n)

    cfg = RacLoraConfig(rank=2, alpha=5.0, target_modules=["lin"], sketch_side=side)
    layer = inject(model, cfg)["lin"]
    layer.double()
    chain = RacLoraChain({"lin": layer})
    chain.start_link(0)
    opt = torch.optim.SGD([layer.factor], lr=gamma / layer.scale**2)
    (0.5 * ((model(X) - Y) ** 2).sum()).backward()
    opt.step()
    chain.end_link()

    if side == "right":
        A = layer.lora_A
        expected = W0.detach() - gamma * G @ (A.T @ A)        # H_A = A^T A when A A^T = I
    else:
        B = layer.lora_B
        expected = W0.detach() - gamma * (B @ B.T) @ G        # H_B = B B^T when B^T B = I
    assert torch.allclose(layer.base_layer.weight, expected, atol=1e-10)
