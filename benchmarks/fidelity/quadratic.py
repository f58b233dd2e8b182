"""The paper's Section 3 counterexample: a 3x3 quadratic with L = 10, rank 1.

``f(W) = 1/2 vec(W - W*)^T M vec(W - W*)``, ``M = diag(10, 1, ..., 1)`` (L = 10, mu = 1),
``W0 = 0``. RAC-LoRA runs the product's ``RacLoraLinear`` and ``RacLoraChain``: one SGD step
per link at ``lr = gamma / s^2`` with an orthonormal sketch, which is exactly the projected
step ``-gamma grad f(W) H`` (tested in tests/unit/test_projection.py). The effective weight is
read off the layer itself: ``layer(I) = W_eff^T``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.fidelity.common import mean_std, rac_chain, run_chain, wrap_two_factor

N, L, MU, RANK = 3, 10.0, 1.0, 1
METHODS = ["full_gd", "lora", "cola", "asym_lora", "rac_right", "rac_left"]


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W* (3, 3), M diagonal (9,))`` for a seed; W* has N(0, 1) entries."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    w_star = torch.randn(N, N, generator=gen, dtype=torch.float64)
    m = torch.ones(N * N, dtype=torch.float64)
    m[0] = L
    return w_star, m


def f(W: torch.Tensor, w_star: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    d = (W - w_star).reshape(-1)
    return 0.5 * (d * m * d).sum()


def _model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("w", nn.Linear(N, N, bias=False, dtype=torch.float64))
    nn.init.zeros_(model.w.weight)
    return model


def _w_eff(model: nn.Module) -> torch.Tensor:
    return model(torch.eye(N, dtype=torch.float64)).T  # y = x W^T with x = I


def run_method(method: str, seed: int, gamma: float, steps: int, cola_k: int = 10) -> list[float]:
    """Gap ``f(W_t) - f*`` (f* = 0) after each of ``steps`` gradient steps (index 0: start).

    A method that overflows reports ``inf`` from then on.
    """
    w_star, m = problem(seed)
    model = _model()
    with torch.no_grad():
        gaps = [float(f(_w_eff(model), w_star, m))]

    def loss_step(_: int) -> None:
        loss = f(_w_eff(model), w_star, m)
        loss.backward()

    def record() -> None:
        with torch.no_grad():
            g = float(f(_w_eff(model), w_star, m))
        gaps.append(g if math.isfinite(g) else math.inf)

    if method == "full_gd":
        opt = torch.optim.SGD(model.parameters(), lr=gamma)
        for _ in range(steps):
            opt.zero_grad()
            loss_step(0)
            opt.step()
            record()
        return gaps
    if method in ("lora", "cola"):
        gen = torch.Generator().manual_seed(seed)
        (layer,) = wrap_two_factor(model, ["w"], RANK, gen)
        opt = torch.optim.SGD([layer.A, layer.B], lr=gamma)
        for i in range(steps):
            opt.zero_grad()
            loss_step(i)
            opt.step()
            if method == "cola" and (i + 1) % cola_k == 0:
                layer.merge_and_reinit(gen)
            record()
        return gaps
    side = "left" if method == "rac_left" else "right"
    chain = rac_chain(model, ["w"], rank=RANK, side=side, seed=seed)
    s = chain.layers["w"].scale
    # One SGD step per link: lr = gamma / s^2 makes the merged update -gamma grad f H exactly.
    run_chain(chain, links=steps, steps=1, step_fn=loss_step,
              optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=gamma / s**2),
              fixed_sketch=(method == "asym_lora"), on_link=lambda _: record())
    return gaps


def pl_bound(f0: float, gamma: float, steps: int) -> list[float]:
    """``(1 - gamma mu r/d)^t (f(W0) - f*)``: the PL rate bound on the expected gap."""
    rho = 1 - gamma * MU * RANK / N
    return [f0 * rho**t for t in range(steps + 1)]


def experiment(seeds: int = 5, steps: int = 400, gammas: tuple[float, ...] = (1 / L, 0.2 / L)) -> dict:
    """All methods x step sizes x seeds; returns a JSON-able result with curves and finals."""
    out: dict = {"n": N, "L": L, "mu": MU, "rank": RANK, "steps": steps, "seeds": seeds, "runs": []}
    for gamma in gammas:
        for method in METHODS:
            curves = [run_method(method, s, gamma, steps) for s in range(seeds)]
            finals = [c[-1] for c in curves]
            finite = [x for x in finals if math.isfinite(x)]
            mean, std = mean_std(finite) if finite else (math.inf, 0.0)
            f0 = statistics_f0(seeds)
            out["runs"].append({
                "method": method, "gamma": gamma, "final_gap_mean": mean, "final_gap_std": std,
                "final_gap_max": max(finals), "diverged": sum(not math.isfinite(x) or x > 1e6 for x in finals),
                "pl_bound_final": pl_bound(f0, gamma, steps)[-1], "mean_curve": _mean_curve(curves),
            })
    return out


def statistics_f0(seeds: int) -> float:
    return sum(float(f(torch.zeros(N, N, dtype=torch.float64), *problem(s))) for s in range(seeds)) / seeds


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gammas = sorted({r["gamma"] for r in result["runs"]}, reverse=True)
    fig, axes = plt.subplots(1, len(gammas), figsize=(6 * len(gammas), 4.2), squeeze=False)
    f0 = statistics_f0(result["seeds"])
    for ax, gamma in zip(axes[0], gammas, strict=False):
        for r in (r for r in result["runs"] if r["gamma"] == gamma):
            curve = [min(max(x, 1e-20), 1e12) for x in r["mean_curve"]]
            ax.semilogy(curve, label=r["method"])
        ax.semilogy(pl_bound(f0, gamma, result["steps"]), "k--", lw=1, label="PL bound (1-γμr/d)^t")
        ax.set_title(f"γ = {gamma:g} (1/L = {1 / L:g})")
        ax.set_xlabel("gradient steps (RAC/Asym: links of 1 step)")
        ax.set_ylabel("f(W_t) - f*  (mean over seeds)")
        ax.set_ylim(1e-20, 1e12)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
