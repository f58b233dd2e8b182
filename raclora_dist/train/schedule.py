"""Per-link learning-rate schedule: linear warm-up, then decay, restarting every link."""

from __future__ import annotations

import math

from raclora_dist.config import TrainSection


def link_lr(tcfg: TrainSection, step_in_link: int, steps_per_link: int) -> float:
    """The LR for the ``step_in_link``-th (0-based) step of a link.

    Each link starts from a zero factor in a fresh subspace, so the warm-up restarts
    (ReLoRA found this essential after an optimizer reset).
    """
    peak, floor = tcfg.lr, tcfg.lr * tcfg.min_lr_ratio
    if step_in_link < tcfg.warmup_steps:
        return peak * (step_in_link + 1) / tcfg.warmup_steps
    decay_steps = max(1, steps_per_link - tcfg.warmup_steps)
    progress = min(1.0, (step_in_link - tcfg.warmup_steps) / decay_steps)
    if tcfg.schedule == "constant":
        return peak
    if tcfg.schedule == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
