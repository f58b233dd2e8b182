"""A run callback that makes every collective cost what it would over a slow network.

This machine's kernel has no ``netem`` qdisc (``tc qdisc add dev lo root netem`` answers
"Specified qdisc kind is unknown"), so the slow link is emulated where the product counts
its traffic: each collective payload added to ``raclora_dist.backends.dist.TRAFFIC`` (every
DistComm call, every DDP gradient bucket, FSDP2's gathers and reductions) also sleeps ``latency + bytes * 8 / rate`` on
every rank, the time a ring all-reduce between 2 workers takes on such a link.

Use: ``run.callbacks=[{class: 'benchmarks.slow_link:SlowLink', args: {latency_ms: 10, mbit: 100}}]``
(the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import time

from raclora_dist.train.callbacks import Callback


class SlowLink(Callback):
    """Args:
        latency_ms, mbit: the emulated link.
        across_only: slow only the collectives whose group spans nodes (the link between
            nodes; inside a node stays fast), as ``TRAFFIC.crosses_nodes`` tells them apart.
    """

    def __init__(self, latency_ms: float = 10.0, mbit: float = 100.0, across_only: bool = False) -> None:
        self.latency, self.bits_per_s, self.across_only = latency_ms / 1e3, mbit * 1e6, across_only

    def on_train_start(self, trainer) -> None:
        from raclora_dist.backends import dist

        traffic = dist.TRAFFIC
        count = traffic.add

        def add(t, group=None) -> None:
            count(t, group)
            if not self.across_only or traffic.crosses_nodes(group):
                time.sleep(self.latency + t.numel() * t.element_size() * 8 / self.bits_per_s)

        traffic.add = add
