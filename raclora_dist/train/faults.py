"""Fault injection for tests: crash the process at a chosen point, like a killed worker.

Controlled by environment variables so no test-only field pollutes the user's config:
``RACLORA_FAULT_AT_STEP=N`` exits right after optimizer step N (1-based global step);
``RACLORA_FAULT_IN_CHECKPOINT=N`` exits halfway through writing this process's N-th
checkpoint (after the chain file, before ``meta.json``).
``os._exit`` skips every cleanup handler, as a SIGKILL would.
"""

from __future__ import annotations

import os

FAULT_EXIT_CODE = 17


def crash_after_step(global_step: int) -> None:
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
