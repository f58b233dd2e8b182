"""Starting worker processes: ``raclora train`` re-runs itself under torchrun when needed."""

from __future__ import annotations

import os
import sys


def under_launcher() -> bool:
    """Whether torchrun (or another elastic launcher) started this process."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def worker_threads(workers: int) -> int:
    """CPU threads per worker: the cores split evenly (torchrun would otherwise force 1)."""
    return max(1, (os.cpu_count() or 1) // workers)


def launch_torchrun(argv: list[str], workers: int) -> int:
    """Runs ``python -m raclora_dist ARGV`` as ``workers`` torchrun processes; returns its code.

    torchrun's agent runs in this process (the command's own, which has checked the config and
    the data): a separate agent process would import torch again before any worker starts
    (1.2-1.5 s of each launch on a 2-core machine). ``--standalone`` rendezvous on a free
    localhost port, so parallel runs do not collide. The workers keep this process's terminal
    (progress bars stay) and environment. A failing worker prints one line (rank, cause, where
    its traceback went); torchrun's own report of the failure (its log lines and its
    ChildFailedError traceback) is left out: it says nothing more.
    """
    # Read by each worker's OpenMP at its start; this process's own threads are set already.
    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(workers)))
    return _quiet_torchrun(["--standalone", f"--nproc_per_node={workers}", "-m", "raclora_dist", *argv])


def _quiet_torchrun(args: list[str]) -> int:
    """torchrun (its command-line ARGS) with its failure report silenced."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    for name in list(logging.root.manager.loggerDict):  # this process only; workers log as usual
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        main(args)
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):  # keyed by global rank
            if failure.exitcode != 1:  # 1: the worker printed its own line (raclora_dist.cli)
                how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
                print(f"raclora: error: rank {rank}: the worker died ({how}, pid {failure.pid})", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGINT/SIGTERM to this process: the agent has stopped the workers
        print(f"raclora: stopped by {err.sigval.name}; the workers were stopped (--resume continues from the "
              "latest checkpoint)", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0
