"""Rewrites a config's local paths for Ray workers that run in another working folder."""

from __future__ import annotations

from pathlib import Path

from raclora_dist.config import RunConfig, with_values
from raclora_dist.data.sources import kind


def absolutize(cfg: RunConfig) -> RunConfig:
    """The config with its local paths made absolute (Ray workers run elsewhere), Ray storage
    and run name defaulted from the run folder; validated again."""
    resolve = lambda p: str(Path(p).resolve())  # noqa: E731
    local = lambda p: resolve(p) if kind(p) == "path" else p  # noqa: E731 -- a Hub name stays a name
    each = lambda v: [local(p) for p in v] if isinstance(v, list) else local(v)  # noqa: E731
    run_dir = resolve(cfg.run.dir)
    changes = {"run.dir": run_dir, "data.path": each(cfg.data.path)}
    if cfg.data.eval_path is not None:
        changes["data.eval_path"] = each(cfg.data.eval_path)
    # Hub names and URIs mean the same on every machine; only local paths are made absolute.
    if cfg.data.tokenizer not in (None, "bytes") and kind(cfg.data.tokenizer) == "path":
        changes["data.tokenizer"] = resolve(cfg.data.tokenizer)
    if cfg.model.name_or_path is not None and kind(cfg.model.name_or_path) == "path":
        changes["model.name_or_path"] = resolve(cfg.model.name_or_path)
    if cfg.ray.storage_path is None:
        changes["ray.storage_path"] = str(Path(run_dir) / "ray")
    elif "://" not in cfg.ray.storage_path:
        changes["ray.storage_path"] = resolve(cfg.ray.storage_path)
    if cfg.ray.name is None:
        changes["ray.name"] = Path(run_dir).name
    return with_values(cfg, changes)
