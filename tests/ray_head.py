"""``ray start --head`` for tests, on 127.0.0.1 and free ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def polling_often(env: dict) -> dict:
    """``env`` for the nodes of a test cluster, whose Ray Train controller then polls its
    workers as an embedded Ray's does (``ray_train.poll_often_on_one_machine``; Ray's own
    setting, which a cluster's operator sets on its nodes the same way)."""
    from raclora_dist.orchestration.ray_train import EMBEDDED_POLL_S, POLL_ENV

    return {POLL_ENV: EMBEDDED_POLL_S, **env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(env: dict, temp: Path, *args: str, dashboard: bool = True, tries: int = 3) -> tuple[int, int | None]:
    """Starts a head; returns its GCS port and dashboard port (None without a dashboard).

    A port found free can be taken by another process before Ray binds it (the machine runs
    other tests), so a start that fails is stopped and tried again on new ports.
    """
    for attempt in range(tries):
        port, dash = free_port(), free_port() if dashboard else None
        ui = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard
              else ["--include-dashboard=false"])
        proc = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", *ui,
                               "--disable-usage-stats", f"--temp-dir={temp}", *args],
                              env=polling_often(env), capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            return port, dash
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        if attempt == tries - 1:
            raise RuntimeError(f"ray start failed {tries} times: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    raise AssertionError("unreachable")
