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


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS``: resident now; ``VmHWM``: the peak,
    reset to the current RSS by writing 5 to /proc/self/clear_refs). 0 where there is none."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
