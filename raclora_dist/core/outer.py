"""The outer step of link-sync (``distributed.sync: link``): how the groups' averaged factors
become the factor every group continues from, or merges.

Each group trains its own copy of the link's factor ``F_i`` from a shared anchor ``F_0``
(zero at the start of a link). A sync round averages them and moves the anchor ``lr`` times
the mean update:

    F_0 <- F_0 + lr (mean_i(F_i) - F_0)

and every group continues from (or, at the boundary, merges) the new ``F_0``. With one round
per link (the default) this is the plain average scaled by ``lr`` (``link_outer_lr``); with
``distributed.link_sync_rounds`` > 1, rounds inside a link (the outer loop of local SGD /
DiLoCo, without its Nesterov momentum, which measured worse: docs/link-sync.md). The anchor
is reset at the merge, since the next link's factor lives in a new sketch's coordinates.
"""

from __future__ import annotations

import torch


class OuterStep:
    """The outer step on this rank's local factors, keyed by layer name.

    Args:
        lr: the outer learning rate (``distributed.link_outer_lr``).
    """

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr
        self.anchor: dict[str, torch.Tensor] = {}  # F_0 per layer (fp32); absent: zero

    def reset(self) -> None:
        """Forgets the anchor (at the merge: a new link, a new sketch)."""
        self.anchor.clear()

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
            new = self.lr * m if anchor is None else anchor + self.lr * (m - anchor)
            f.copy_(new.to(f.dtype))
            self.anchor[name] = new
