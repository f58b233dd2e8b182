"""Helpers every kind of test uses: the tiny model config, config files, the CLI in a
subprocess, fault injection and small readers. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "stdlib_docstrings.jsonl"

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 260,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}


def tiny_config(data: Path, run_dir: Path, **sections) -> dict:
    """A config dict for a 2-layer Llama that trains in a second or two per link."""
    cfg = {
        "run": {"dir": str(run_dir)},
        "model": {"config": dict(TINY_MODEL), "dtype": "float32", "init_seed": 0},
        "data": {"path": str(data), "tokenizer": "bytes", "seq_len": 32, "eval_fraction": 0.1},
        "raclora": {"rank": 2, "alpha": 4, "links": 3, "steps_per_link": 3, "seed": 0,
                    "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "train": {"batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "eval_batches": 2},
        "checkpoint": {"every_links": 1, "keep": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict:
    """The environment of a subprocess run: unbuffered, with the repository root importable in
    every worker (torchrun's and Ray's), so that ``tests.faults`` can be named as a callback."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def as_on_a_terminal() -> None:
    """SIGINT at its default, as a terminal's Ctrl-C meets it: a shell running this suite in
    the background (CI) ignores it, and a child would inherit that and never be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def faults(**kwargs) -> str:
    """The override ``run.callbacks=[...]`` that installs :class:`tests.faults.Faults` with
    ``kwargs`` (e.g. ``crash_at_step=5``) in every worker of the run."""
    args = ", ".join(f"{k}: {json.dumps(v)}" for k, v in kwargs.items())
    return f"run.callbacks=[{{class: 'tests.faults:Faults', args: {{{args}}}}}]"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m raclora_dist ARGS`` in a subprocess (real entry point, real exit code)."""
    full_env = subprocess_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "raclora_dist", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict:
    """``relative path -> sha256`` of every file under ``folder`` (to show nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def captured_logs(level: int = logging.INFO):
    """The messages the package logs inside the block (a list filled as they come): a handler on
    the ``raclora_dist`` logger itself, since the console setup stops propagation to the root."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("raclora_dist")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
