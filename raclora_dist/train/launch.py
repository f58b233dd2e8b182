"""Starting worker processes: ``raclora train`` re-runs itself under torchrun when needed."""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    """Whether torchrun (or another elastic launcher) started this process."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def worker_threads(workers: int) -> int:
    """CPU threads per worker: the cores split evenly (torchrun would otherwise force 1)."""
    return max(1, (os.cpu_count() or 1) // workers)


def launch_torchrun(argv: list[str], workers: int) -> int:
    """Runs ``python -m raclora_dist ARGV`` as ``workers`` torchrun processes; returns its code.

    ``--standalone`` rendezvous on a free localhost port, so parallel runs do not collide.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(worker_threads(workers)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "raclora_dist", *argv]
    return subprocess.call(cmd, env=env)
