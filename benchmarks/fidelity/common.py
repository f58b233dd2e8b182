"""Shared pieces of the fidelity experiments: baselines, the RAC-LoRA driver, tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable

import torch
from torch import nn

from raclora_dist.core import RacLoraChain, RacLoraConfig, inject


class TwoFactorLoRA(nn.Module):
    """Baseline LoRA with *both* factors trainable (LoRA; COLA when merged and re-initialised).

    The product's ``RacLoraLinear`` deliberately trains one factor only, so the baselines the
    paper compares against need this small module. Init as in LoRA: ``A ~ N(0, 1/n)``,
    ``B = 0``.

    Args:
        base: the wrapped linear layer (frozen here). rank: r. gen: CPU generator for A.
    """

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        m, n = base.out_features, base.in_features
        dt = base.weight.dtype
        self.A = nn.Parameter(torch.zeros(rank, n, dtype=dt))
        self.B = nn.Parameter(torch.zeros(m, rank, dtype=dt))
        self.reinit(gen)

    @torch.no_grad()
    def reinit(self, gen: torch.Generator) -> None:
        n = self.A.shape[1]
        self.A.copy_(torch.randn(self.A.shape, generator=gen, dtype=torch.float64) / math.sqrt(n))
        self.B.zero_()

    @torch.no_grad()
    def merge_and_reinit(self, gen: torch.Generator) -> None:
        """COLA's link boundary: ``W += B A``, then a fresh LoRA init (in place)."""
        self.base.weight.add_(self.B @ self.A)
        self.reinit(gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T


def wrap_two_factor(model: nn.Module, names: Iterable[str], rank: int, gen: torch.Generator) -> list[TwoFactorLoRA]:
    """Replaces the named linear layers with :class:`TwoFactorLoRA` (in place)."""
    out = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = TwoFactorLoRA(getattr(parent, child), rank, gen)
        setattr(parent, child, layer)
        out.append(layer)
    for p in model.parameters():
        if not any(p is q for layer in out for q in (layer.A, layer.B)):
            p.requires_grad_(False)
    return out


def rac_chain(model: nn.Module, targets: list[str], *, rank: int, side: str, seed: int,
              dist: str = "orthogonal", alpha: float | None = None) -> RacLoraChain:
    """Injects the product's RAC-LoRA layers into ``model`` and returns the chain."""
    cfg = RacLoraConfig(rank=rank, alpha=alpha if alpha is not None else rank, target_modules=targets,
                        sketch_side=side, sketch_dist=dist, seed=seed)
    dtype = next(model.parameters()).dtype  # before injection adds fp32 factors
    layers = inject(model, cfg)
    for layer in layers.values():
        layer.to(dtype)
    return RacLoraChain(layers)


def run_chain(chain: RacLoraChain, links: int, steps: int, step_fn: Callable[[int], None],
              optimizer_factory: Callable[[list], torch.optim.Optimizer], fixed_sketch: bool = False,
              on_link: Callable[[int], None] | None = None) -> None:
    """Drives a chain: per link resample (or keep link 0's sketch), ``steps`` steps, merge.

    ``fixed_sketch=True`` is Asymmetric LoRA: the same sketch every link, so all merged
    updates live in one subspace.
    """
    for t in range(links):
        chain.start_link(0 if fixed_sketch else t)
        opt = optimizer_factory(chain.trainable_parameters())
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            step_fn(t * steps + k)
            opt.step()
        chain.end_link()
        if on_link is not None:
            on_link(t)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    """Prints (and returns) a plain-text table."""
    cells = [[str(h) for h in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=False)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in cells[1:]]
    text = "\n".join(lines)
    print(text)
    return text
