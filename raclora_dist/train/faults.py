"""Fault injection for tests: crash the process at a chosen point, like a killed worker.

Controlled by environment variables so no test-only field pollutes the user's config:
``RACLORA_FAULT_AT_STEP=N`` exits right after optimizer step N (1-based global step);
``RACLORA_FAULT_IN_CHECKPOINT=N`` exits halfway through writing this process's N-th
checkpoint (after the chain file, before ``meta.json``).
``os._exit`` skips every cleanup handler, as a SIGKILL would.

Ray test hooks: ``RACLORA_TEST_PID_DIR=D`` makes each worker write ``D/rank<R>.pid`` when it
starts (so a test can kill one by PID); ``RACLORA_TEST_STEP_SLEEP=S`` sleeps S seconds per step
(so a kill lands mid-link); ``RACLORA_TEST_DIE_BEFORE_REPORT=R`` makes rank R exit once, at
its first checkpoint report (after rank 0 has written the checkpoint into the run folder,
before Ray has it from every worker); a marker in the PID folder keeps the restart alive.

Distributed test hooks: ``RACLORA_TEST_DESYNC_RANK=R`` gives rank R another chain seed from
link 1 on (its sketches then differ from the other ranks'); ``RACLORA_TEST_NAN_RANK=R`` with
``RACLORA_TEST_NAN_LINK=T`` writes a NaN into rank R's first factor at the end of link T.
"""

from __future__ import annotations

import os

import torch

FAULT_EXIT_CODE = 17


def write_pid(rank: int) -> None:
    folder = os.environ.get("RACLORA_TEST_PID_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def before_report(rank: int) -> None:
    at, folder = os.environ.get("RACLORA_TEST_DIE_BEFORE_REPORT"), os.environ.get("RACLORA_TEST_PID_DIR")
    if at is not None and folder and int(at) == rank:
        marker = os.path.join(folder, "died-before-report")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(FAULT_EXIT_CODE)


def after_step(global_step: int) -> None:
    """Test hooks run after every optimizer step: an optional sleep, an optional crash."""
    delay = os.environ.get("RACLORA_TEST_STEP_SLEEP")
    if delay:
        import time

        time.sleep(float(delay))
    at = os.environ.get("RACLORA_FAULT_AT_STEP")
    if at is not None and int(at) == global_step:
        os._exit(FAULT_EXIT_CODE)


_checkpoints_written = 0


def crash_in_checkpoint() -> None:
    global _checkpoints_written
    _checkpoints_written += 1
    at = os.environ.get("RACLORA_FAULT_IN_CHECKPOINT")
    if at is not None and int(at) == _checkpoints_written:
        os._exit(FAULT_EXIT_CODE)


def desync_hook(layers: dict, rank: int, link: int) -> None:
    at = os.environ.get("RACLORA_TEST_DESYNC_RANK")
    if at is not None and int(at) == rank and link == 1:
        for layer in layers.values():
            layer.seed += 1


@torch.no_grad()
def nan_hook(layers: dict, rank: int, link: int) -> None:
    r, t = os.environ.get("RACLORA_TEST_NAN_RANK"), os.environ.get("RACLORA_TEST_NAN_LINK")
    if r is not None and t is not None and int(r) == rank and int(t) == link:
        f = next(iter(layers.values())).factor
        local = f.to_local() if hasattr(f, "to_local") else f
        if local.numel():
            local.view(-1)[0] = float("nan")
