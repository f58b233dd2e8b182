"""``raclora runs [DIR]``: the runs in a folder at a glance, read from their files alone.

A run folder is one with a ``config.yaml``. Its state:

* ``running``: ``running.json`` names a process that is alive on this machine, or, written on
  another machine (a shared run folder), was touched within :data:`STALE_S` (rank 0 writes
  it when training starts, touches it every :data:`HEARTBEAT_S` and removes it when training
  ends, failed or not; a killed process leaves it, and it goes stale);
* ``finished``: the latest complete checkpoint is past the last link;
* ``resumable``: not running and not finished, with a complete checkpoint (``--resume``);
* ``failed``: not running, nothing to resume from.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from raclora_dist.checkpoint.folder import find_latest
from raclora_dist.files import write_atomic
from raclora_dist.observe.metrics import read_metrics


def running_marker(run_dir: Path) -> Path:
    return Path(run_dir) / "running.json"


def mark_running(run_dir: Path) -> None:
    """Rank 0: this process is training ``run_dir`` (removed by :func:`clear_running`)."""
    write_atomic(running_marker(run_dir), json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def clear_running(run_dir: Path) -> None:
    running_marker(run_dir).unlink(missing_ok=True)


HEARTBEAT_S = 30.0  # how often a running process touches its marker
STALE_S = 120.0  # another machine's marker untouched this long: its process is gone


@contextlib.contextmanager
def running(run_dir: Path) -> Iterator[None]:
    """Rank 0, around training: the marker exists, kept fresh, while the block runs, and is
    removed however it ends (an exception included)."""
    mark_running(run_dir)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(running_marker(run_dir))

    threading.Thread(target=beat, name="raclora-running-marker", daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        clear_running(run_dir)


def _alive(marker: Path) -> bool:
    try:
        info = json.loads(marker.read_text())
        age = time.time() - marker.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("host") != socket.gethostname():
        return age < STALE_S  # another machine's process: alive while it keeps the marker fresh
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def describe(run_dir: Path) -> dict:
    """One run's row: name, engine x workers, links done/total, eval first -> last, state."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    links = int(cfg.get("raclora", {}).get("links", 0))
    dist = cfg.get("distributed", {})
    try:
        recs = read_metrics(run_dir)
    except (OSError, json.JSONDecodeError):
        recs = []
    done = sorted({r["link"] for r in recs if r.get("type") == "link"})
    evals = [r["eval_loss"] for r in recs if r.get("type") == "eval"] + \
            [r["eval_loss"] for r in recs if r.get("type") == "link"]
    ckpt = find_latest(run_dir)
    next_link = json.loads((ckpt / "meta.json").read_text())["next_link"] if ckpt is not None else 0
    if _alive(running_marker(run_dir)):
        state = "running"
    elif ckpt is not None and next_link >= links:
        state = "finished"
    elif ckpt is not None:
        state = "resumable"
    else:
        state = "failed"
    return {"name": run_dir.name, "engine": f"{dist.get('strategy', 'single')} x {dist.get('workers', 1)}",
            "links_done": len(done), "links": links, "eval_first": evals[0] if evals else None,
            "eval_last": evals[-1] if len(evals) > 1 else None, "state": state}


def list_runs(folder: Path) -> list[dict]:
    """The rows of every run folder directly in ``folder`` (or ``folder`` itself), by name."""
    folder = Path(folder)
    dirs = [folder] if (folder / "config.yaml").is_file() else sorted(
        d for d in folder.iterdir() if d.is_dir() and (d / "config.yaml").is_file())
    return [describe(d) for d in dirs]


def table(rows: list[dict]) -> str:
    def loss(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{'run':24} {'engine':14} {'links':>7} {'eval loss':>15}  state"]
    for r in rows:
        lines.append(f"{r['name'][:24]:24} {r['engine']:14} {r['links_done']:>3}/{r['links']:<3} "
                     f"{loss(r['eval_first']):>7}->{loss(r['eval_last']):<7}  {r['state']}")
    return "\n".join(lines)
