"""The outer step of link-sync (``distributed.sync: link``): how the groups' averaged factors
become the factor every group continues from, or merges.

Each group trains its own copy of the link's factor ``F_i`` from a shared anchor ``F_0``
(zero at the start of a link). A sync round averages them and takes one outer step on the
outer gradient ``g = F_0 - mean_i(F_i)`` (the negative mean update):

    v <- mu v + g;   F_0 <- F_0 - lr (g + mu v)      (Nesterov; mu = 0: F_0 - lr g)

and every group continues from (or, at the boundary, merges) the new ``F_0``. With one round
per link (the default) and ``mu = 0`` this is the plain average scaled by ``lr``
(``link_outer_lr``). Several rounds inside a link with momentum is DiLoCo's outer loop
(Douillard et al., 2023) on RAC-LoRA's factor; the momentum and the anchor are reset at the
merge, since the next link's factor lives in a new sketch's coordinates.
"""

from __future__ import annotations

import torch


class OuterStep:
    """Outer SGD (optionally Nesterov) on this rank's local factors, keyed by layer name.

    Args:
        lr: the outer learning rate (``distributed.link_outer_lr``).
        momentum: Nesterov momentum ``mu`` (``distributed.outer_momentum``; 0: none).
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum
        self.anchor: dict[str, torch.Tensor] = {}  # F_0 per layer (fp32); absent: zero
        self.velocity: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forgets the anchor and the momentum (at the merge: a new link, a new sketch)."""
        self.anchor.clear()
        self.velocity.clear()

    @torch.no_grad()
    def apply(self, local: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> None:
        """Writes the new anchor into each local factor (in place) and keeps it.

        Args:
            local: this rank's factors (or shards), written in place.
            mean: their mean over the groups, the same shapes.
        """
        for name, f in local.items():
            m = mean[name].float()
            anchor = self.anchor.get(name)
            anchor = torch.zeros_like(m) if anchor is None else anchor
            g = anchor - m
            if self.momentum:
                v = self.velocity.get(name)
                v = g.clone() if v is None else v.mul_(self.momentum).add_(g)
                self.velocity[name] = v
                g = g + self.momentum * v
            new = anchor - self.lr * g
            f.copy_(new.to(f.dtype))
            self.anchor[name] = new
