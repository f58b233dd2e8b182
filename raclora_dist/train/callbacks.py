"""Callbacks: user code that runs inside the training loop, on every rank.

A run names them in its config, by import path, with optional keyword arguments::

    run:
      callbacks:
        - mypkg.hooks:LogToSlack                 # a class, built with no arguments
        - {class: mypkg.hooks:StopAt, args: {loss: 2.5}}

Each worker (torchrun or Ray Train) imports and builds them itself, so the module must be
importable there (installed, or on ``PYTHONPATH``). A callback subclasses :class:`Callback`
(or provides every hook) and overrides the ones it needs; each hook gets the :class:`~raclora_dist.train.loop.Trainer`
(its ``cfg``, ``backend`` with ``info.rank``, ``s`` with the model, layers and chain) and is
called on every rank at the same point, so a hook may use collectives if it does so on all
ranks. Hooks run between optimizer steps; exceptions propagate and stop the run.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


class Callback:
    """Hooks of the training loop, in the order they are reached. All do nothing by default."""

    def on_train_start(self, trainer) -> None:
        """The model is loaded and set up by the engine; nothing trained yet (also on resume)."""

    def before_link(self, trainer, link: int) -> None:
        """Before link ``link`` draws its sketches (not called when resuming mid-link)."""

    def on_record(self, trainer, record: dict) -> None:
        """Each metrics line as it is made (``type``: step, link, eval, samples, startup, resume,
        resize), before the hook of its moment (``on_step_end``, ``on_boundary``). The built-in
        :class:`~raclora_dist.train.reporting.MetricsFile` appends them to ``metrics.jsonl``."""

    def on_step_end(self, trainer, record: dict) -> None:
        """After each optimizer step; ``record`` is the step's metrics line."""

    def before_boundary(self, trainer, link: int) -> None:
        """Link ``link`` finished its steps; its factors are about to be checked and merged."""

    def on_boundary(self, trainer, record: dict) -> None:
        """After the merge and evaluation of a link; ``record`` is its metrics line."""

    def on_checkpoint_write(self, folder: Path) -> None:
        """Rank 0 only, inside a checkpoint write: the chain file is in the temporary ``folder``
        and ``meta.json`` (which makes it complete) is not yet."""

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        """A complete checkpoint ``folder`` was written (before it is reported to Ray);
        ``record``: the metrics line of the link (at a boundary) or the step (mid-link,
        ``checkpoint.every_steps``) it was taken after."""

    def on_train_end(self, trainer) -> None:
        """The loop ended, by finishing or by an exception (called from a ``finally``)."""


def load_callbacks(specs: list[str | dict[str, Any]]) -> list[Callback]:
    """Imports and builds the callbacks a config names (``module:Class`` or
    ``{class: module:Class, args: {...}}``).

    Raises:
        ValueError: a spec cannot be imported or built; the message names it.
    """
    out = []
    for spec in specs:
        path, args = (spec, {}) if isinstance(spec, str) else (spec.get("class", ""), dict(spec.get("args") or {}))
        module_name, sep, attr = str(path).partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"run.callbacks: {path!r} is not of the form 'package.module:Class'")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"run.callbacks: cannot import {path!r} ({err})") from None
        try:
            out.append(cls(**args))
        except TypeError as err:
            raise ValueError(f"run.callbacks: cannot build {path!r} with {args} ({err})") from None
    return out


class CallbackList(Callback):
    """Calls each hook on every callback in turn."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args) -> None:
        # A callback may define any subset of the hooks (the trackers define one): the protocol
        # is the method names, and subclassing Callback only supplies the empty defaults.
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def on_train_start(self, trainer) -> None:
        self._each("on_train_start", trainer)

    def before_link(self, trainer, link: int) -> None:
        self._each("before_link", trainer, link)

    def on_record(self, trainer, record: dict) -> None:
        self._each("on_record", trainer, record)

    def on_step_end(self, trainer, record: dict) -> None:
        self._each("on_step_end", trainer, record)

    def before_boundary(self, trainer, link: int) -> None:
        self._each("before_boundary", trainer, link)

    def on_boundary(self, trainer, record: dict) -> None:
        self._each("on_boundary", trainer, record)

    def on_checkpoint_write(self, folder: Path) -> None:
        self._each("on_checkpoint_write", folder)

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        self._each("on_checkpoint", trainer, folder, record)

    def on_train_end(self, trainer) -> None:
        self._each("on_train_end", trainer)
