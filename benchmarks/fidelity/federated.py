"""The paper's quadratic in the federated setting: link-sync RAC-LoRA against federated LoRA.

M workers hold heterogeneous local objectives
``f_i(W) = 1/2 vec(W - W_i*)^T M vec(W - W_i*)`` whose mean is the paper's quadratic
(:mod:`benchmarks.fidelity.quadratic`: ``M = diag(10, 1, ..., 1)``) up to a constant: the
``W_i* = W* + D_i`` scatter around ``W*`` (``sum_i D_i = 0``, ``D_i ~ N(0, 1)``), so every
worker's optimum is far from the global one.

Each link, every worker takes ``K`` local SGD steps on its own ``f_i`` from the same merged
weight, through the product's ``RacLoraLinear``/``RacLoraChain`` (the same seed, hence the
same sketch on every worker); the boundary averages the workers' trained factors, as
``distributed.sync: link`` does with one all-reduce, and every worker merges the mean.
Because the sketch is shared, the mean factor is exactly the mean of the workers' updates,
and because the local maps are affine with a common linear part, that mean is the update
``K`` local steps on the global ``f`` would make: link-sync RAC-LoRA converges to ``W*``,
and its gap after ``t`` links stays below the one-step PL bound ``(1 - gamma mu r / d)^t``.

Baselines: the same with a fixed sketch (all links in one subspace: stalls), and federated
LoRA (both factors trained locally from a shared init, each averaged on its own, then
merged as ``mean(B) mean(A)``, which is not ``mean(B_i A_i)``).

Driving several workers in one process is a simulation of the all-reduce (a plain mean);
the all-reduce itself is tested with real processes (tests/distributed/test_link_sync.py).
"""

from __future__ import annotations

import math

import torch

from benchmarks.fidelity.common import TwoFactorLoRA, rac_chain
from benchmarks.fidelity.quadratic import MU, RANK, L, N, _model, _w_eff, f, problem

WORKERS = 4
METHODS = ["rac_link", "fixed_sketch", "fed_lora"]


def local_optima(seed: int, workers: int = WORKERS) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(W*, M, [W_i*])`` with ``mean_i W_i* = W*``: the workers' optima scatter around it."""
    w_star, m = problem(seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    d = torch.randn(workers, N, N, generator=gen, dtype=torch.float64)
    d -= d.mean(0)
    return w_star, m, [w_star + d[i] for i in range(workers)]


def run_federated(method: str, seed: int, gamma: float, links: int, local_steps: int,
                  workers: int = WORKERS) -> list[float]:
    """Global gap ``f(W_t) - f*`` after each of ``links`` rounds (index 0: the start)."""
    w_star, m, optima = local_optima(seed, workers)
    models = [_model() for _ in range(workers)]
    with torch.no_grad():
        gaps = [float(f(_w_eff(models[0]), w_star, m))]
    if method == "fed_lora":
        return gaps + _fed_lora(models, optima, m, w_star, seed, gamma, links, local_steps)
    chains = [rac_chain(model, ["w"], rank=RANK, side="right", seed=seed) for model in models]
    s = chains[0].layers["w"].scale
    for t in range(links):
        for chain in chains:
            chain.start_link(0 if method == "fixed_sketch" else t)
        for model, chain, opt_i in zip(models, chains, optima, strict=False):
            # lr = gamma / s^2: each step moves W_eff by exactly -gamma grad f_i H (projected GD).
            opt = torch.optim.SGD(chain.trainable_parameters(), lr=gamma / s**2)
            for _ in range(local_steps):
                opt.zero_grad(set_to_none=True)
                f(_w_eff(model), opt_i, m).backward()
                opt.step()
        mean = torch.stack([c.layers["w"].factor.detach() for c in chains]).mean(0)
        for chain in chains:
            with torch.no_grad():
                chain.layers["w"].factor.copy_(mean)
            chain.end_link()
        with torch.no_grad():
            g = float(f(_w_eff(models[0]), w_star, m))
        gaps.append(g if math.isfinite(g) else math.inf)
    return gaps


def _fed_lora(models, optima, m, w_star, seed, gamma, links, local_steps) -> list[float]:
    gaps = []
    W = torch.zeros(N, N, dtype=torch.float64)
    for t in range(links):
        factors = []
        for model, opt_i in zip(models, optima, strict=False):
            gen = torch.Generator().manual_seed(seed * 100_000 + t)  # the round's shared init
            with torch.no_grad():
                model.w.weight.copy_(W)
            layer = TwoFactorLoRA(model.w, RANK, gen)
            opt = torch.optim.SGD([layer.A, layer.B], lr=gamma)
            for _ in range(local_steps):
                opt.zero_grad(set_to_none=True)
                f(layer.base.weight + layer.B @ layer.A, opt_i, m).backward()
                opt.step()
            factors.append((layer.B.detach(), layer.A.detach()))
        B = torch.stack([b for b, _ in factors]).mean(0)
        A = torch.stack([a for _, a in factors]).mean(0)
        W = W + B @ A
        g = float(f(W, w_star, m))
        gaps.append(g if math.isfinite(g) else math.inf)
    return gaps


def pl_bound(f0: float, gamma: float, links: int) -> list[float]:
    """``(1 - gamma mu r / d)^t f0``: the one-step PL bound, which K >= 1 local steps with
    ``gamma <= 1/L`` keep (each later step in the link only lowers the global objective)."""
    rho = 1 - gamma * MU * RANK / N
    return [f0 * rho**t for t in range(links + 1)]


def experiment(seeds: int = 5, links: int = 200, local_steps: tuple[int, ...] = (1, 4, 16),
               gammas: tuple[float, ...] = (1 / L, 0.2 / L)) -> dict:
    """Every method x K x gamma x seed; the final gaps (JSON-able)."""
    out: dict = {"workers": WORKERS, "n": N, "L": L, "mu": MU, "rank": RANK, "links": links, "seeds": seeds, "runs": []}
    for gamma in gammas:
        for k in local_steps:
            for method in METHODS:
                finals = [run_federated(method, s, gamma, links, k)[-1] for s in range(seeds)]
                f0 = run_federated(method, 0, gamma, 0, k)[0]
                out["runs"].append({"method": method, "gamma": gamma, "local_steps": k,
                                    "final_gap_mean": sum(finals) / len(finals), "final_gap_max": max(finals),
                                    "pl_bound_seed0": pl_bound(f0, gamma, links)[-1]})
    return out
