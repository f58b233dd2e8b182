"""Where the package's messages go: every module logs to ``logging.getLogger(__name__)`` (all
under ``raclora_dist``); the command line and each Ray Train worker show them on the console
as plain lines, rank 0's alone. A program that imports the package and configures ``logging``
itself gets them through its own handlers (INFO progress, WARNING notices), and nothing on its
console until it does.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

PACKAGE = "raclora_dist"


class _Console(logging.StreamHandler):
    """The console handler :func:`console` installs (one per process)."""

    def retarget(self, stream: TextIO) -> TextIO:
        """Writes to ``stream`` from now on; returns the old stream. Unlike ``setStream`` it does
        not flush the old one, which may be closed already (a test's captured stdout)."""
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        return old


def console(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Shows the package's messages at ``level`` and above as plain lines on ``stream``
    (stdout by default). Idempotent: a second call only retargets the one handler.

    Written with ``stream.write`` (not ``print``): Ray Train patches ``print`` in its workers,
    and would send each line to the driver twice.
    """
    logger = logging.getLogger(PACKAGE)
    target = stream or sys.stdout
    handler = next((h for h in logger.handlers if isinstance(h, _Console)), None)
    if handler is None:
        handler = _Console(target)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    else:
        handler.retarget(target)
    logger.setLevel(level)
    logger.propagate = False  # a root handler (Ray's, the user's) would print each line again


def rank_only(is_main: bool) -> None:
    """On every rank but rank 0, keeps warnings and errors only: the ranks run in lockstep, and
    one rank's progress lines say what every rank did."""
    if not is_main:
        logging.getLogger(PACKAGE).setLevel(logging.WARNING)


@contextlib.contextmanager
def console_on(stream: TextIO) -> Iterator[None]:
    """Sends the console's lines to ``stream`` inside the block (the launching process's own
    checks go to stderr, ahead of the run's report on stdout); no console, no change."""
    handler = next((h for h in logging.getLogger(PACKAGE).handlers if isinstance(h, _Console)), None)
    if handler is None:
        yield
        return
    old = handler.retarget(stream)
    try:
        yield
    finally:
        handler.retarget(old)
