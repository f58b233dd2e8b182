"""The training loop: links of K optimizer steps, a coordinated boundary between them.

Reads top to bottom: ``fit`` runs links; ``_train_link`` runs a link's steps; ``_boundary``
does the merge/resample protocol between two optimizer steps, then evaluates, records and
checkpoints. The same loop runs in one process and on every rank of a distributed run:
the backend supplies the engine-specific pieces, and every rank reaches each boundary at
the same step because the schedule is deterministic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raclora_dist.backends import Backend
from raclora_dist.backends.dist import TRAFFIC
from raclora_dist.checkpoint.folder import Checkpoint
from raclora_dist.config import RunConfig
from raclora_dist.core.dtypes import torch_dtype
from raclora_dist.core.outer import OuterStep
from raclora_dist.data.batches import PackedData
from raclora_dist.data.formats import IGNORE
from raclora_dist.files import write_atomic
from raclora_dist.model.session import Session
from raclora_dist.observe.metrics import device_peak_mb, landed_warning, link_line, resize_line, rss_mb
from raclora_dist.train.callbacks import Callback, CallbackList
from raclora_dist.train.reporting import MetricsFile, ProgressBar, StartupReport
from raclora_dist.train.saving import CheckpointWriter
from raclora_dist.train.schedule import link_lr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured (the same on every rank).

    Attributes:
        loss: the mean training loss over the step's micro-batches and ranks.
        grad_norm: the factors' gradient norm before clipping (NaN where the engine has none).
        trained_tokens: the tokens the loss covered, over all ranks (instruction/chat data:
            the labelled ones; else every token after the first of each row).
    """

    loss: float
    grad_norm: float
    trained_tokens: int


def _labelled(labels: torch.Tensor) -> int:
    """Tokens a causal-LM loss covers in (B, T) labels: those after the first, not -100."""
    return int((labels[:, 1:] != -100).sum())


class Trainer:
    """Runs the chain's links on this rank.

    Args:
        cfg: the run config. session: model and chain (the backend has set the model up).
        data: packed batches. run_dir: where rank 0 writes metrics and checkpoints.
        backend: the engine (single, ddp, fsdp2, deepspeed).
        on_checkpoint: called on every rank after each checkpoint with what this rank must
            hand to storage (Ray reports it): rank 0 the checkpoint folder, the first rank of
            another disk the part its disk's ranks wrote (removed afterwards), the others None.
        startup: load time and memory, reported after the first step.
        callbacks: user hooks (:mod:`raclora_dist.train.callbacks`), called on every rank.
    """

    def __init__(self, cfg: RunConfig, session: Session, data: PackedData, run_dir: Path,
                 backend: Backend,
                 on_checkpoint: Callable[[Path | None, dict], None] | None = None, startup: dict | None = None,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg, self.s, self.data, self.run_dir = cfg, session, data, Path(run_dir)
        self.backend, self.comm = backend, backend.comm
        # Collective payload this rank sent since the last boundary: all of it, across nodes.
        self._link_bytes = self._link_across = 0
        d = cfg.distributed
        # Link-sync's outer step (core/outer.py) and its rounds inside a link (0: the boundary only).
        self.outer = OuterStep(d.link_outer_lr)
        self.sync_every = cfg.raclora.steps_per_link // d.link_sync_rounds if d.link_sync_rounds > 1 else 0
        self.is_main = backend.info.is_main
        self.global_step = 0
        self.history: list[dict] = []
        # The built-in records and reports first, then the user's callbacks.
        builtin: list[Callback] = [MetricsFile(self.run_dir)] if self.is_main else []
        builtin.append(ProgressBar())
        if startup is not None:
            builtin.append(StartupReport(startup))
        if cfg.train.sample_prompts:
            from raclora_dist.train.samples import SampleAnswers, Sampler

            sampler = Sampler(cfg.train.sample_prompts, session.tokenizer, cfg.data, data.masked, cfg.train.sample_tokens)
            builtin.append(SampleAnswers(sampler))
        self.callbacks = CallbackList([*builtin, *(callbacks or [])])
        self.saver = CheckpointWriter(cfg, session, backend, self.run_dir, self.callbacks, on_checkpoint)
        self.tokens_per_link = (cfg.train.batch_size * cfg.train.grad_accum * data.train.shape[1]
                                * cfg.raclora.steps_per_link)

    def write(self, record: dict) -> None:
        """Hands a metrics line to the callbacks (``on_record``; the built-in
        :class:`~raclora_dist.train.reporting.MetricsFile` appends it to ``metrics.jsonl`` on rank 0)."""
        self.callbacks.on_record(self, record)

    def restore(self, ckpt: Checkpoint) -> tuple[int, int]:
        """Continues from ``ckpt`` (its chain was replayed when the session was built): the
        engine's optimizer state, the step count and the RNG; records the resume. Returns
        ``(link, step in that link)`` to start :meth:`fit` from."""
        self.backend.load_state(ckpt.path)
        self.global_step = ckpt.global_step
        torch.set_rng_state(ckpt.rng)
        logger.info(f"resumed {self.run_dir} at link {ckpt.next_link + 1} (step {ckpt.global_step})")
        self.write({"type": "resume", "link": ckpt.next_link, "step": ckpt.global_step})
        # The size of the group that ran last (it may have stopped before writing a checkpoint
        # of its own), else the checkpoint's.
        was, now = self._last_group_size() or ckpt.meta.get("world_size"), self.backend.info.world_size
        if was is not None and was != now:
            # An elastic group that shrank or grew (or a resume on another size): the global
            # batch is the same, each rank's slice of it is not.
            logger.info(resize_line(was, now, ckpt.next_link))
            self.write({"type": "resize", "link": ckpt.next_link, "step": ckpt.global_step, "from_workers": was,
                        "to_workers": now})
        return ckpt.next_link, ckpt.step_in_link

    GROUP_FILE = "group.json"  # the size of the worker group that runs (rank 0's run folder)

    def _last_group_size(self) -> int | None:
        try:
            return int(json.loads((self.run_dir / self.GROUP_FILE).read_text())["workers"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def fit(self, start_link: int = 0, start_step: int = 0) -> list[dict]:
        """Trains links ``start_link .. links-1``; returns the link records written.

        ``start_step`` > 0 resumes ``start_link`` mid-link (its factors already restored).
        """
        rc = self.cfg.raclora
        if self.is_main:
            write_atomic(self.run_dir / self.GROUP_FILE, json.dumps({"workers": self.backend.info.world_size}))
        self.backend.model.train()
        if start_link == 0 and self.global_step == 0:
            t0 = time.perf_counter()
            loss = self.evaluate()
            self.write({"type": "eval", "step": 0, "eval_loss": loss, "eval_s": time.perf_counter() - t0})
        self.callbacks.on_train_start(self)
        try:
            for link in range(start_link, rc.links):
                if self.s.chain.link != link:
                    self.callbacks.before_link(self, link)
                    sent, across = TRAFFIC.total, TRAFFIC.across
                    self.s.chain.start_link(link, self.comm)
                    self._link_bytes += TRAFFIC.total - sent  # the fingerprint check
                    self._link_across += TRAFFIC.across - across
                t0 = time.perf_counter()
                loss = self._train_link(link, start_step if link == start_link else 0)
                self._boundary(link, loss, time.perf_counter() - t0)
        finally:
            self.callbacks.on_train_end(self)
        return self.history

    def _train_link(self, link: int, start: int = 0) -> float:
        """Steps ``start .. K-1`` on the current sketch; returns their mean training loss."""
        rc, tc = self.cfg.raclora, self.cfg.train
        every = self.cfg.checkpoint.every_steps
        losses = []
        for k in range(start, rc.steps_per_link):
            lr = link_lr(tc, k, rc.steps_per_link)
            self.backend.set_lr(lr)
            t0 = time.perf_counter()
            sent, across = TRAFFIC.total, TRAFFIC.across
            step = self._step()
            if self.sync_every and (k + 1) % self.sync_every == 0 and k + 1 < rc.steps_per_link:
                # a sync round inside the link (its bytes are this step's)
                self.s.chain.sync_round(self.comm, self.backend.link_average(), self.outer,
                                        torch_dtype(self.cfg.distributed.link_sync_dtype))
            loss = step.loss
            sent, across = TRAFFIC.total - sent, TRAFFIC.across - across
            self._link_bytes += sent
            self._link_across += across
            self.global_step += 1
            dt = time.perf_counter() - t0
            tokens = tc.batch_size * tc.grad_accum * self.data.train.shape[1]
            rec = {"type": "step", "step": self.global_step, "link": link, "loss": loss, "lr": lr,
                   "grad_norm": step.grad_norm, "tokens_per_s": tokens / dt, "rss_mb": rss_mb(), "comm_bytes": sent,
                   "comm_bytes_across": across}
            if self.data.masked:  # instruction/chat: the tokens the loss covers, apart from all tokens
                rec["trained_tokens"] = step.trained_tokens
                rec["trained_tokens_per_s"] = step.trained_tokens / dt
            gpu = device_peak_mb(self.backend.info.device)
            if gpu is not None:
                rec["gpu_peak_mb"] = gpu
            self.write(rec)
            losses.append(loss)
            if every and self.global_step % every == 0 and k + 1 < rc.steps_per_link:
                self.saver.save(self, link, k + 1, rec)  # mid-link: the step's line goes with it
            self.callbacks.on_step_end(self, rec)
        return sum(losses) / len(losses)

    def _step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` global micro-batches; returns what it measured.

        Each rank takes its equal slice of every global micro-batch, so the averaged
        gradient equals the one-process gradient of the same global batch.
        """
        tc, b = self.cfg.train, self.backend
        total = 0.0
        trained = 0
        for micro in range(tc.grad_accum):
            batch = self.data.train_inputs(self.global_step * tc.grad_accum + micro)  # fields (B, T)
            local: dict[str, Any] = {k: b.local_batch(v) for k, v in batch.items()}  # (B / world, T) on this rank
            if "labels" in batch:
                per_rank = [_labelled(part) for part in batch["labels"].chunk(b.info.world_size)]
                trained += sum(per_rank)
                local["num_items"] = b.loss_scale_items(per_rank)
            with b.micro_batch(last=micro == tc.grad_accum - 1):
                loss = b.forward(**local)
                b.backward(loss, tc.grad_accum)
            total += loss.item()
        grad_norm = b.step(tc.grad_clip)
        # Logged loss: the mean over ranks (one scalar all-reduce; identity in one process), or
        # over rank 0's group in link-sync mode (nothing crosses groups between boundaries).
        comm = b.step_comm or self.comm
        mean = float(comm.all_reduce_mean(torch.tensor([total / tc.grad_accum], dtype=torch.float64)))
        return StepResult(mean, float(grad_norm), trained)

    def _boundary(self, link: int, train_loss: float, link_time: float) -> None:
        """Guard + merge (in the chain), optimizer reset, eval, record, checkpoint."""
        chain, rc = self.s.chain, self.cfg.raclora
        self.callbacks.before_boundary(self, link)
        sent, across = TRAFFIC.total, TRAFFIC.across
        record = chain.end_link(self.comm, average=self.backend.link_average(), outer=self.outer,
                                payload=torch_dtype(self.cfg.distributed.link_sync_dtype))
        sent, across = TRAFFIC.total - sent, TRAFFIC.across - across
        if rc.optimizer_state == "reset":
            # Adam moments describe the old sketch's coordinates; they mean nothing in the
            # next link's subspace.
            self.backend.reset_optimizer()
        # What this rank sent in collectives over the link: its fingerprint check, its steps
        # and the boundary.
        link_bytes, self._link_bytes = self._link_bytes + sent, 0
        link_across, self._link_across = self._link_across + across, 0
        t0 = time.perf_counter()
        eval_loss = self.evaluate()
        rec = {**record.to_dict(), "train_loss": train_loss, "eval_loss": eval_loss, "eval_s": time.perf_counter() - t0,
               "link_time_s": link_time, "step": self.global_step, "comm_bytes_boundary": sent,
               "comm_bytes_link": link_bytes, "comm_bytes_boundary_across": across,
               "comm_bytes_link_across": link_across, "master_weights": chain.keeps_master()}
        self.write(rec)
        self.history.append(rec)
        logger.info(link_line(rec, rc.links, self.tokens_per_link))
        warning = landed_warning(rec, self.history[-2] if len(self.history) > 1 else None)
        if warning is not None:
            logger.info(warning)
        self.callbacks.on_boundary(self, rec)
        last = link + 1 == rc.links
        if last or (link + 1) % self.cfg.checkpoint.every_links == 0:
            self.saver.save(self, link + 1, 0, rec)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed eval batches (NaN when none), as one process computes it:
        each batch's loss is the mean over its tokens (its labelled tokens for instruction and
        chat data), and the batches count equally.

        Each rank evaluates its share of every batch's rows and the per-batch token-loss sums
        and token counts are summed across ranks (one all-reduce of 2 numbers per batch), so W
        workers do 1/W of the work each. Every rank runs the same number of rows (engines that
        exchange activations, such as the vocabulary-split head, need equal shapes): a share
        short of ``ceil(B / W)`` rows is filled with copies of the batch's first row whose
        labels are all -100, which count for nothing.
        """
        batches = self.data.eval_inputs(self.cfg.train.eval_batches)
        if not batches:
            return float("nan")
        b = self.backend
        world, rank = b.info.world_size, b.info.rank
        model = b.model
        model.eval()
        sums = torch.zeros(len(batches), 2, dtype=torch.float64)  # (token-loss sum, tokens) per batch
        for i, batch in enumerate(batches):
            batch = {**batch, "labels": batch.get("labels", batch["input_ids"])}  # text: loss on every token
            rows = len(batch["input_ids"])
            share = -(-rows // world)
            lo, hi = min(rank * share, rows), min((rank + 1) * share, rows)
            mine = {k: v[lo:hi] for k, v in batch.items()}
            if hi - lo < share:
                filler = {k: v[:1].repeat(share - (hi - lo), 1) for k, v in batch.items()}
                filler["labels"] = torch.full_like(filler["labels"], IGNORE)
                mine = {k: torch.cat([mine[k], filler[k]]) for k in mine}
            # num_items=1: the loss comes back as the sum over the labelled tokens, not their mean
            loss_sum = b.forward(**mine, num_items=1.0).item()
            sums[i] = torch.tensor([loss_sum, _labelled(mine["labels"])], dtype=torch.float64)
        model.train()
        sums = self.comm.all_reduce_sum(sums)
        counted = sums[:, 1] > 0
        if not counted.any():
            return float("nan")
        return float((sums[counted, 0] / sums[counted, 1]).mean())
