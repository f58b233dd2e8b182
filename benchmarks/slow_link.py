"""A run callback that makes every collective cost what it would over a slow network.

This machine's kernel has no ``netem`` qdisc (``tc qdisc add dev lo root netem`` answers
"Specified qdisc kind is unknown"), so the slow link is emulated where the product counts
its traffic: each collective payload added to ``raclora_dist.backends.dist.TRAFFIC`` (every
DistComm call and every DDP gradient bucket) also sleeps ``latency + bytes * 8 / rate`` on
every rank, the time a ring all-reduce between 2 workers takes on such a link.

Use: ``run.callbacks=[{class: 'benchmarks.slow_link:SlowLink', args: {latency_ms: 10, mbit: 100}}]``
(the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import time

from raclora_dist.train.callbacks import Callback


class SlowLink(Callback):
    def __init__(self, latency_ms: float = 10.0, mbit: float = 100.0) -> None:
        self.latency, self.bits_per_s = latency_ms / 1e3, mbit * 1e6

    def on_train_start(self, trainer) -> None:
        from raclora_dist.backends import dist

        count = dist.TRAFFIC.add

        def add(t) -> None:
            count(t)
            time.sleep(self.latency + t.numel() * t.element_size() * 8 / self.bits_per_s)

        dist.TRAFFIC.add = add
