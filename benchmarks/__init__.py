"""Benchmarks: each is run by a command, prints a table and writes JSON (see README.md)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, result: dict) -> None:
    """Writes a benchmark's result (creating the folder) and says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {path}")
