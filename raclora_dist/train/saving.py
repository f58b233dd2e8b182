"""The trainer's checkpoint writer: what a checkpoint's ``meta.json`` says, and the hand-off of
a complete checkpoint to the callbacks and to storage (Ray).

Every rank calls :meth:`CheckpointWriter.save` at the same point (the write is collective:
mid-link factors are gathered, engines write their own state, ranks meet at barriers); rank
0 writes the chain's record and ``meta.json`` (:func:`raclora_dist.checkpoint.folder.save_checkpoint`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from raclora_dist.backends import Backend
from raclora_dist.backends.dist import shared_token
from raclora_dist.checkpoint.folder import ckpt_root, save_checkpoint
from raclora_dist.checkpoint.link_files import LinkStore
from raclora_dist.checkpoint.parts import own_part
from raclora_dist.config import RunConfig
from raclora_dist.model.session import Session
from raclora_dist.train.callbacks import CallbackList


class CheckpointWriter:
    """Writes the run's checkpoints and hands each complete one over.

    Args:
        cfg: the run config. session: model, layers and chain. backend: the engine (its
            state, rank and barrier). run_dir: the run folder.
        callbacks: told of each checkpoint (``on_checkpoint_write`` inside the write on rank
            0, ``on_checkpoint`` once it is complete).
        on_checkpoint: called on every rank after each checkpoint with what this rank must hand
            to storage (Ray reports it): rank 0 the checkpoint folder, the first rank of another
            disk the part its disk's ranks wrote (removed afterwards), the others None.
    """

    def __init__(self, cfg: RunConfig, session: Session, backend: Backend, run_dir: Path, callbacks: CallbackList,
                 on_checkpoint: Callable[[Path | None, dict], None] | None = None) -> None:
        self.cfg, self.s, self.backend, self.run_dir = cfg, session, backend, run_dir
        self.callbacks, self.on_checkpoint = callbacks, on_checkpoint
        self.attempt = shared_token()  # names checkpoint staging folders (collective)
        # The record of merged links: written once per link by rank 0 and let go of after each
        # checkpoint, so that no rank's memory grows with the chain (other ranks keep none).
        state = session.chain.state
        self.links = LinkStore(ckpt_root(run_dir) / "chain" if backend.info.is_main else None, state.factors)
        state.factors = self.links

    def save(self, trainer, next_link: int, step_in_link: int, record: dict) -> Path:
        """Checkpoints ``trainer``'s run at a boundary (``next_link`` to start, ``step_in_link``
        0) or mid-link (``step_in_link`` > 0 steps of ``next_link`` done; its factors so far are
        saved too), then hands it over. ``record``: the metrics line of the link or the step it
        ends on. Collective. Returns the checkpoint folder."""
        path = self._write(next_link, step_in_link, trainer.global_step)
        self.callbacks.on_checkpoint(trainer, path, record)
        info = self.backend.info
        part = None if info.is_main else own_part(path, info.rank)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path if info.is_main else part, record)
        if part is not None:  # in storage now (nothing else reads it: a resume installs from there)
            shutil.rmtree(part, ignore_errors=True)
        return path

    def _write(self, next_link: int, step_in_link: int, global_step: int) -> Path:
        chain, d = self.s.chain, self.cfg.distributed
        self.links.spill()  # each link's file is written once, here, by rank 0
        current = None
        if step_in_link:  # gathered on every rank (collective), written by rank 0
            current = {n: chain.access.full_factor(layer) for n, layer in self.s.layers.items()}
        meta = {"next_link": next_link, "step_in_link": step_in_link, "global_step": global_step,
                "strategy": d.strategy, "world_size": self.backend.info.world_size, "replicas": d.replicas,
                "sync": d.sync, "sync_groups": d.sync_groups,
                "layers": [layer.spec.to_dict() for layer in self.s.layers.values()],
                "fingerprint_link": chain.link,
                "fingerprints": [str(x) for x in chain.fingerprints().tolist()]}
        return save_checkpoint(self.run_dir, chain.state, meta, self.cfg.checkpoint.keep,
                               write_state=self.backend.save_state, is_main=self.backend.info.is_main,
                               barrier=self.backend.barrier, current=current,
                               on_write=self.callbacks.on_checkpoint_write, rank=self.backend.info.rank,
                               attempt=self.attempt)
