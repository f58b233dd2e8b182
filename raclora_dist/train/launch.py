"""Starting worker processes: ``raclora train`` re-runs itself under torchrun when needed."""

from __future__ import annotations

import os
import re
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
    The workers' output passes through as it comes. A failing worker prints one line (rank,
    cause, where its traceback went); torchrun's own report of the failure (its log lines and
    the launcher's traceback) is left out, since it says nothing more.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(worker_threads(workers)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "raclora_dist", *argv]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    report = False
    for line in proc.stderr:
        # torchrun logs in glog format ("E1130 12:00:00.000000 123 .../elastic/...": stopping
        # the other workers, the failure) and then raises ChildFailedError: from the first
        # such line on, it is torchrun's report.
        report = report or _TORCHRUN_ERROR.match(line) is not None or line.startswith("Traceback (most recent")
        if not report:
            sys.stderr.write(line)
            sys.stderr.flush()
    return proc.wait()


_TORCHRUN_ERROR = re.compile(r"^[EW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/elastic/")
