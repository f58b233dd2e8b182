"""Fault injection for tests: a training-loop callback (``raclora_dist.train.callbacks``).

Runs name it through the config, e.g. ``faults(crash_at_step=5)`` from ``tests.helpers``
gives the override ``run.callbacks=[{class: tests.faults:Faults, args: {crash_at_step: 5}}]``.
Workers import it, so the repository root must be importable there (``run_cli`` puts it on
``PYTHONPATH``). ``os._exit`` skips every cleanup handler, as a SIGKILL would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from raclora_dist.train.callbacks import Callback

FAULT_EXIT_CODE = 17


class Faults(Callback):
    """Crashes, stalls and corruptions at chosen points of a run.

    Args:
        crash_at_step: exit right after this (1-based, global) optimizer step.
        raise_at_step: raise a RuntimeError after this step, on ``raise_rank`` (an ordinary
            bug in a worker, as opposed to a killed process).
        crash_in_checkpoint: exit halfway through this process's N-th checkpoint write (after
            the chain file, before ``meta.json``).
        sleep_per_step: seconds to sleep after each step.
        hold_at_world: while the group has this many workers, rank 0 holds after its first
            step (``pid_dir/held-at-world<N>``) until it is killed: an elastic group that shrank
            waits there for Ray to grow it (which stops it), instead of finishing first.
        hold_at_step, hold_rank: after this step, rank ``hold_rank`` writes
            ``pid_dir/held-at-step<k>`` and waits there to be killed (up to 10 minutes): a
            test kills it when the marker appears, so the kill lands at that step whatever the
            machine's load. Once only: a restarted worker finds the marker and goes on.
        pid_dir: each worker writes ``pid_dir/rank<R>.pid`` when training starts.
        die_before_report: this rank exits once, at its first checkpoint (after rank 0 wrote
            it into the run folder, before Ray has it from every worker); a marker in
            ``pid_dir`` keeps the restarted group alive.
        desync_rank: this rank uses another chain seed from link 1 on.
        nan_rank, nan_link: this rank writes a NaN into its first factor at the end of that link.
    """

    def __init__(self, crash_at_step: int | None = None, crash_in_checkpoint: int | None = None,
                 sleep_per_step: float = 0.0, pid_dir: str | None = None, die_before_report: int | None = None,
                 desync_rank: int | None = None, nan_rank: int | None = None, nan_link: int | None = None,
                 raise_at_step: int | None = None, raise_rank: int = 0, hold_at_step: int | None = None,
                 hold_rank: int = 0, hold_at_world: int | None = None) -> None:
        self.crash_at_step, self.crash_in_checkpoint = crash_at_step, crash_in_checkpoint
        self.raise_at_step, self.raise_rank = raise_at_step, raise_rank
        self.sleep_per_step, self.pid_dir, self.die_before_report = sleep_per_step, pid_dir, die_before_report
        self.desync_rank, self.nan_rank, self.nan_link = desync_rank, nan_rank, nan_link
        self.hold_at_step, self.hold_rank, self.hold_at_world = hold_at_step, hold_rank, hold_at_world
        self._checkpoints = 0

    def on_train_start(self, trainer) -> None:
        if self.pid_dir:
            os.makedirs(self.pid_dir, exist_ok=True)
            Path(self.pid_dir, f"rank{trainer.backend.info.rank}.pid").write_text(str(os.getpid()))

    def before_link(self, trainer, link: int) -> None:
        if self.desync_rank == trainer.backend.info.rank and link == 1:
            for layer in trainer.s.layers.values():
                layer.seed += 1

    def on_step_end(self, trainer, record: dict) -> None:
        if self.sleep_per_step:
            time.sleep(self.sleep_per_step)
        if self.crash_at_step == record["step"]:
            os._exit(FAULT_EXIT_CODE)
        if self.raise_at_step == record["step"] and trainer.backend.info.rank == self.raise_rank:
            raise RuntimeError(f"injected failure at step {record['step']}")
        if self.hold_at_step == record["step"] and trainer.backend.info.rank == self.hold_rank and self.pid_dir:
            marker = Path(self.pid_dir, f"held-at-step{record['step']}")
            if not marker.exists():
                marker.touch()
                _hold()
        info = trainer.backend.info
        if self.hold_at_world == info.world_size and info.rank == 0 and self.pid_dir:
            Path(self.pid_dir, f"held-at-world{info.world_size}").touch()
            _hold()

    @torch.no_grad()
    def before_boundary(self, trainer, link: int) -> None:
        if self.nan_rank == trainer.backend.info.rank and self.nan_link == link:
            f = next(iter(trainer.s.layers.values())).factor
            local = f.to_local() if hasattr(f, "to_local") else f
            if local.numel():
                local.view(-1)[0] = float("nan")

    def on_checkpoint_write(self, folder: Path) -> None:
        self._checkpoints += 1
        if self.crash_in_checkpoint == self._checkpoints:
            os._exit(FAULT_EXIT_CODE)

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        if self.die_before_report is not None and self.die_before_report == trainer.backend.info.rank and self.pid_dir:
            marker = Path(self.pid_dir, "died-before-report")
            if not marker.exists():
                marker.touch()
                os._exit(FAULT_EXIT_CODE)


def _hold() -> None:
    """Waits (up to 10 minutes) for the test, or Ray, to kill this process."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.1)


def wait_for_marker(marker: Path, process, what: str) -> None:
    """Waits until ``marker`` exists (a worker holding at a step: :class:`Faults`), failing at
    once if ``process`` (a ``subprocess.Popen``) ends first. The 10-minute bound guards against
    a hang; it is not a speed check."""
    deadline = time.monotonic() + 600
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened")
        time.sleep(0.1)

