"""Injection: wrap the target linear layers of any ``nn.Module`` with ``RacLoraLinear``.

Targets follow PEFT's ``target_modules`` conventions: a list of names, each matching a
module whose qualified name equals it or ends with ``"." + name``; or one string, a regex
that must match the whole qualified name. The wrapper is chosen by an ordered list of
dispatchers (quantized base types register themselves first; dense ``nn.Linear`` is last).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from raclora_dist.core.config import RacLoraConfig
from raclora_dist.core.layer import RacLoraLinear, RankError, SharedProjection, resolve_side

# A dispatcher returns the wrapper class for a base layer it supports, else None.
Dispatcher = Callable[[nn.Module], "type[RacLoraLinear] | None"]


def _dense(module: nn.Module) -> type[RacLoraLinear] | None:
    return RacLoraLinear if type(module) is nn.Linear else None


_DISPATCHERS: list[tuple[str, Dispatcher]] = [("torch.nn.Linear", _dense)]


def register_dispatcher(label: str, fn: Dispatcher) -> None:
    """Registers a dispatcher ahead of the dense one (quantized types go first)."""
    if all(existing != label for existing, _ in _DISPATCHERS):
        _DISPATCHERS.insert(0, (label, fn))


def _wrapper_for(module: nn.Module) -> type[RacLoraLinear] | None:
    for _, fn in _DISPATCHERS:
        cls = fn(module)
        if cls is not None:
            return cls
    return None


class TargetError(ValueError):
    """A target pattern matched nothing, or matched an unsupported layer."""


def match_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the modules ``targets`` selects, in model order.

    Raises:
        TargetError: if a pattern matches no module; the message lists the candidate
            (linear-like) module names.
    """
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        rx = re.compile(targets)
        hits = [n for n in names if rx.fullmatch(n)]
        unmatched = [] if hits else [targets]
    else:
        hits = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in hits)]
    if unmatched:
        raise TargetError(
            f"raclora.target_modules: {', '.join(map(repr, unmatched))} matched no module; "
            f"candidates: {', '.join(candidate_names(model)) or '(no linear layers)'}"
        )
    return hits


def candidate_names(model: nn.Module) -> list[str]:
    """Short names (last component) of the modules a dispatcher supports, deduplicated."""
    seen: dict[str, None] = {}
    for name, mod in model.named_modules():
        if name and _wrapper_for(mod) is not None:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def inject(model: nn.Module, cfg: RacLoraConfig) -> dict[str, RacLoraLinear]:
    """Freezes ``model`` and replaces each target layer with a RAC-LoRA wrapper, in place.

    Returns:
        The wrappers by qualified name, in model order. Their factors are zero and their
        sketches unset: call ``RacLoraChain.start_link`` before the first forward.

    Raises:
        TargetError: a pattern matched nothing or a matched layer's type is unsupported.
        RankError: the rank exceeds a layer's sketched dimension (names the module).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_targets(model, match_targets(model, cfg.target_modules), cfg)


def wrap_targets(model: nn.Module, names: Sequence[str], cfg: RacLoraConfig) -> dict[str, RacLoraLinear]:
    """Wraps the modules ``names`` (from :func:`match_targets`) in place; freezes nothing.

    Loading a large model wraps each part's targets as soon as that part is real, so
    ``names`` may be a subset; sketch groups are formed within it (a group's members share
    a parent module, which never straddles two parts).

    Raises:
        TargetError: a matched layer's type is unsupported, or a sketch group's members
            read inputs of different widths.
        RankError: the rank exceeds a layer's sketched dimension (names the module).
    """
    wrapped: dict[str, RacLoraLinear] = {}
    groups = sketch_groups(list(names), cfg.sketch_groups)
    grouped = {n for members in groups.values() for n in members}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        cls = _wrapper_for(base)
        if cls is None:
            supported = ", ".join(label for label, _ in _DISPATCHERS)
            raise TargetError(
                f"raclora.target_modules matched {name!r} of type {type(base).__name__}, "
                f"which cannot be wrapped; supported types: {supported}"
            )
        # Sketch-group members share the input-side sketch, so they are right-sketched.
        side = "right" if name in grouped else resolve_side(cfg.sketch_side, base.out_features, base.in_features)
        try:
            layer = cls(
                base,
                name,
                rank=cfg.rank,
                alpha=cfg.alpha,
                side=side,
                dist=cfg.sketch_dist,
                seed=cfg.seed,
                rslora=cfg.rslora,
                merge_mode=cfg.merge_mode,
                chain_capacity=cfg.chain_capacity(base.out_features, base.in_features),
                chain_dtype=cfg.chain_dtype,
                master_weights=cfg.master_weights,
                stochastic_rounding=cfg.stochastic_rounding,
            )
        except RankError as err:
            raise RankError(f"raclora.rank={cfg.rank}: {err}") from None
        setattr(parent, child, layer)
        wrapped[name] = layer
    for key, members in groups.items():
        widths = {wrapped[n].in_features for n in members}
        if len(widths) > 1:
            raise TargetError(f"raclora.sketch_groups: {', '.join(members)} read inputs of different widths {sorted(widths)}; "
                              "a shared sketch needs one input")
        shared = SharedProjection(len(members))
        for n in members:
            wrapped[n].sketch_key, wrapped[n].shared = key, shared
    return wrapped


def sketch_groups(names: list[str], groups: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """Targets that share a sketch: per parent module, the targets named in one group.

    Returns:
        ``{sketch key: member names}`` for every set of at least two members, where the key
        is ``parent.q_proj+k_proj+v_proj`` (the members present, in model order).
    """
    found: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        for i, group in enumerate(groups):
            if child in group:
                found.setdefault((parent, i), []).append(name)
    return {
        f"{parent}.{'+'.join(n.rpartition('.')[2] for n in members)}" if parent else "+".join(members): members
        for (parent, _), members in found.items() if len(members) >= 2
    }
