"""What a config names on disk, and what may change when a run resumes.

Kept apart from :mod:`raclora_dist.config` (the schema and how a config is read): these
rules look at files and at a run's saved config. (The Ray driver's path rewriting is
:mod:`raclora_dist.orchestration.paths`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raclora_dist.config import ConfigError, RunConfig
from raclora_dist.data.tokenizer import tokenizer_source

# Fields that may differ between a run and its resumption (they do not change the chain).
RESUMABLE_CHANGES = ("raclora.links", "checkpoint.", "run.", "train.eval_batches", "train.sample_", "distributed.",
                     "ray.")
PATH_FIELDS = ("data.path", "data.eval_path", "data.tokenizer", "model.name_or_path")



def check_paths(cfg: RunConfig) -> None:
    """Checks that the files a config names exist (the config itself is already valid)."""
    from raclora_dist.data.sources import kind

    for field, paths in (("data.path", cfg.data.paths), ("data.eval_path", cfg.data.eval_paths)):
        for path in paths:
            if kind(path) != "hub" and not Path(path).exists():
                raise ConfigError(f"{field}: {path!r} does not exist (a file or a folder)")

    tok = cfg.data.tokenizer
    if tok not in (None, "bytes") and kind(tok) == "path" and not Path(tok).expanduser().is_dir():
        raise ConfigError(f"data.tokenizer: {tok!r} is neither 'bytes', a folder, a Hugging Face Hub name "
                          "(org/name) nor a URI")
    model = cfg.model.name_or_path
    if model is not None and kind(model) == "path" and not Path(model).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: {model!r} is neither a local folder, a Hugging Face Hub name "
                          "(org/name[@revision]) nor an object-storage URI (s3://..., gs://...)")


def _same_paths(a: str | list[str], b: str | list[str]) -> bool:
    """Whether two path fields name the same files (relative or absolute)."""
    a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    return len(a) == len(b) and all(Path(x).resolve() == Path(y).resolve() for x, y in zip(a, b, strict=False))


def diff_configs(saved: RunConfig, given: RunConfig) -> list[str]:
    """Dotted fields whose values differ, excluding those a resumption may change."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            key = prefix[:-1]
            if key in PATH_FIELDS and a and b and a != "bytes" and _same_paths(a, b):
                return
            if not any(key == c or key.startswith(c) for c in RESUMABLE_CHANGES):
                out.append(f"{key}: run has {a!r}, config has {b!r}")

    def dump(cfg: RunConfig) -> dict:
        # The tokenizer as the run reads it: run configs saved before it was resolved at
        # use time hold the resolved name, newer ones may leave it unset.
        data = cfg.model_dump(mode="json")
        data["data"]["tokenizer"] = tokenizer_source(cfg)
        return data

    walk(dump(saved), dump(given), "")
    return out
