"""The loop's built-in records and reports, as callbacks on the protocol users have
(:mod:`raclora_dist.train.callbacks`): the metrics file, the progress bar and the start-up
report. The trainer runs them before the user's callbacks; each rank runs them (the start-up
report's per-rank columns are a collective), and rank 0 alone shows or writes what they produce.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from raclora_dist.observe.metrics import MetricsWriter, device_peak_mb, progress_bar, rss_mb
from raclora_dist.train.callbacks import Callback

logger = logging.getLogger(__name__)


class MetricsFile(Callback):
    """Appends every metrics line to ``run_dir/metrics.jsonl`` (built on rank 0 only), flushed
    per line so that a crash loses none; closed when the loop ends."""

    def __init__(self, run_dir: Path) -> None:
        self.writer: MetricsWriter | None = MetricsWriter(run_dir)

    def on_record(self, trainer, record: dict) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """A tqdm bar over the run's steps on rank 0's interactive terminal (none in logs, which
    get a line per link)."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, trainer) -> None:
        if trainer.is_main:
            rc = trainer.cfg.raclora
            self.bar = progress_bar(rc.links * rc.steps_per_link, trainer.global_step)

    def on_step_end(self, trainer, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(link=record["link"], loss=f"{record['loss']:.3f}")

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StartupReport(Callback):
    """After the first step: how long loading and that step took, and each rank's memory (RSS
    in MiB at the start of the run, just before loading the base, peak once loaded, peak after
    the first step; on GPUs also the allocator's peak once loaded and after the first step),
    written as a ``startup`` record and summed up in one line.

    Args:
        startup: ``t_start`` (``time.perf_counter()`` at the run's start), ``load_s`` and this
            rank's ``rss_mb_start``, ``rss_mb_before_load``, ``peak_rss_mb_loaded`` (and
            ``gpu_peak_mb_loaded`` on GPUs).
    """

    def __init__(self, startup: dict) -> None:
        self.startup: dict | None = startup

    def on_step_end(self, trainer, record: dict) -> None:
        if self.startup is None:
            return
        st, self.startup = self.startup, None
        keys = ["rss_mb_start", "rss_mb_before_load", "peak_rss_mb_loaded"]
        columns = {k: per_rank(trainer, st[k]) for k in keys + (["gpu_peak_mb_loaded"] if "gpu_peak_mb_loaded" in st else [])}
        columns["peak_rss_mb_first_step"] = per_rank(trainer, rss_mb())
        gpu = device_peak_mb(trainer.backend.info.device)
        if gpu is not None:
            columns["gpu_peak_mb_first_step"] = per_rank(trainer, gpu)
        first = time.perf_counter() - st["t_start"]
        trainer.write({"type": "startup", "load_s": st["load_s"], "first_step_s": first, **columns})
        above = [p - s for p, s in zip(columns["peak_rss_mb_first_step"], columns["rss_mb_start"], strict=False)]
        logger.info(f"first step {first:.1f} s after start (loading {st['load_s']:.1f} s); peak RSS above the start "
                    f"per rank: {', '.join(f'{a:,.0f}' for a in above)} MiB")


def per_rank(trainer, value: float) -> list[float]:
    """Every rank's ``value``, in rank order (one small all-reduce of a one-hot vector; collective)."""
    info = trainer.backend.info
    t = torch.zeros(info.world_size, dtype=torch.float64)
    t[info.rank] = value
    return trainer.comm.all_reduce_sum(t).tolist()
