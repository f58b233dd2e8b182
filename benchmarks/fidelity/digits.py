"""The paper's Table 3 transfer experiment on scikit-learn's bundled 8x8 digits.

An MLP 64-64-64-5 is pre-trained on digits 0-4, then adapted to 5-9 (labels 5-9 -> 0-4 on
the same 5-way head) at rank 1 by: full fine-tuning, LoRA, COLA, Asymmetric LoRA and
RAC-LoRA with each sketch side (the product's layer and chain). Every method gets the same
number of optimizer steps on the same batches. Trainable parameters are counted the paper's
way: per link, the factor(s) being trained (right sketch: sum of m; left: sum of n).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.fidelity.common import mean_std, rac_chain, run_chain, wrap_two_factor

TARGETS = ["fc1", "fc2", "fc3"]
METHODS = ["full_ft", "lora", "cola", "asym_lora", "rac_right", "rac_left"]


def load_split(seed: int = 0):
    """Standardised digits; returns ``(pre_train, transfer_train, transfer_test)`` as (X, y)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(1234)  # the split is fixed; seeds vary the methods
    perm = torch.randperm(len(y), generator=gen)
    X, y = X[perm], y[perm]
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    low, high = y < 5, y >= 5
    Xh, yh = X[high], y[high] - 5
    cut = int(0.7 * len(yh))
    return (X[low], y[low]), (Xh[:cut], yh[:cut]), (Xh[cut:], yh[cut:])


def mlp() -> nn.Module:
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(64, 64))
    m.add_module("a1", nn.ReLU())
    m.add_module("fc2", nn.Linear(64, 64))
    m.add_module("a2", nn.ReLU())
    m.add_module("fc3", nn.Linear(64, 5))
    return m


def pretrain(data, epochs: int = 60, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp()
    X, y = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    X, y = data
    return float((model(X).argmax(-1) == y).float().mean()) * 100


def adapt(base: nn.Module, method: str, train, seed: int, links: int, steps: int, lr: float) -> tuple[nn.Module, int]:
    """Adapts a copy of ``base``; returns it and its trainable parameters per link."""
    model = copy.deepcopy(base)
    X, y = train
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(len(y), (64,), generator=gen) for _ in range(links * steps)]

    def step(i: int) -> None:
        idx = batches[i]
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()

    if method in ("full_ft", "lora", "cola"):
        if method == "full_ft":
            params = list(model.parameters())
        else:
            layers = wrap_two_factor(model, TARGETS, 1, torch.Generator().manual_seed(seed))
            params = [p for layer in layers for p in (layer.A, layer.B)]
        opt = torch.optim.Adam(params, lr=lr)
        for i in range(links * steps):
            opt.zero_grad()
            step(i)
            opt.step()
            if method == "cola" and (i + 1) % steps == 0:
                for layer in layers:
                    layer.merge_and_reinit(gen)
                opt = torch.optim.Adam(params, lr=lr)
        return model, sum(p.numel() for p in params)
    side = "left" if method == "rac_left" else "right"
    chain = rac_chain(model, TARGETS, rank=1, side=side, seed=seed)
    run_chain(chain, links, steps, step, lambda ps: torch.optim.Adam(ps, lr=lr),
              fixed_sketch=(method == "asym_lora"))
    return model, chain.num_trainable()


def experiment(seeds: int = 5, links: int = 20, steps: int = 50, lr: float = 1e-2) -> dict:
    """Every method over ``seeds``; returns accuracy mean/std and trainable parameter counts."""
    pre, train, test = load_split()
    base = pretrain(pre)
    result = {"pretrain_acc_on_0_4": accuracy(base, pre), "zero_shot_acc_on_5_9": accuracy(base, test),
              "links": links, "steps_per_link": steps, "lr": lr, "seeds": seeds, "methods": {}}
    for method in METHODS:
        accs, n_params = [], 0
        for s in range(seeds):
            model, n_params = adapt(base, method, train, s, links, steps, lr)
            accs.append(accuracy(model, test))
        mean, std = mean_std(accs)
        result["methods"][method] = {"acc_mean": mean, "acc_std": std, "accs": accs, "trainable": n_params}
    return result


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    means = [result["methods"][n]["acc_mean"] for n in names]
    stds = [result["methods"][n]["acc_std"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, means, yerr=stds, capsize=4, color=["grey", "C1", "C2", "C3", "C0", "C9"])
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.set_ylim(min(means) - 10, 100)
    ax.set_title(f"Transfer 0-4 -> 5-9, rank 1, {result['seeds']} seeds")
    for i, m in enumerate(means):
        ax.text(i, m + 1, f"{m:.1f}", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
