"""Rewrites a config's local paths for Ray workers that run in another working folder."""

from __future__ import annotations

from pathlib import Path

from raclora_dist.config import RunConfig


def absolutize(cfg: RunConfig) -> RunConfig:
    """Makes the config's local paths absolute (in place): Ray workers run elsewhere."""
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    resolve = lambda p: str(Path(p).resolve())  # noqa: E731
    cfg.data.path = [resolve(p) for p in cfg.data.path] if isinstance(cfg.data.path, list) else resolve(cfg.data.path)
    if cfg.data.eval_path is not None:
        cfg.data.eval_path = ([resolve(p) for p in cfg.data.eval_path] if isinstance(cfg.data.eval_path, list)
                              else resolve(cfg.data.eval_path))
    if cfg.data.tokenizer != "bytes":
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())
    if cfg.model.name_or_path is not None:
        cfg.model.name_or_path = str(Path(cfg.model.name_or_path).resolve())
    if cfg.ray.storage_path is None:
        cfg.ray.storage_path = str(Path(cfg.run.dir) / "ray")
    elif "://" not in cfg.ray.storage_path:
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).resolve())
    if cfg.ray.name is None:
        cfg.ray.name = Path(cfg.run.dir).name
    return cfg
