"""The training loop: links of K optimizer steps, a coordinated boundary between them.

Reads top to bottom: ``fit`` runs links; ``_train_link`` runs a link's steps; ``_boundary``
does the merge/resample protocol between two optimizer steps, then evaluates, records and
checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from raclora_dist.config import RunConfig
from raclora_dist.core import Comm, LocalComm
from raclora_dist.train.checkpoint import save_checkpoint
from raclora_dist.train.data import PackedData
from raclora_dist.train.faults import crash_after_step
from raclora_dist.train.metrics import MetricsWriter, progress_bar, rss_mb
from raclora_dist.train.schedule import link_lr
from raclora_dist.train.session import Session


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


class Trainer:
    """Runs the chain's links on one process (distributed backends supply ``comm``).

    Args:
        cfg: the run config. session: model and chain. data: packed batches.
        run_dir: where metrics and checkpoints go.
        comm: collectives for the boundary protocol (identity in one process).
        log: where per-link summary lines go.
    """

    def __init__(self, cfg: RunConfig, session: Session, data: PackedData, run_dir: Path,
                 comm: Comm | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.s, self.data, self.run_dir = cfg, session, data, Path(run_dir)
        self.comm = comm or LocalComm()
        self.log = log
        self.params = session.chain.trainable_parameters()
        self.optimizer = make_optimizer(cfg, self.params)
        self.global_step = 0
        self.metrics = MetricsWriter(self.run_dir)
        self.history: list[dict] = []

    def fit(self, start_link: int = 0) -> list[dict]:
        """Trains links ``start_link .. links-1``; returns the link records written."""
        rc = self.cfg.raclora
        total = rc.links * rc.steps_per_link
        self._bar = progress_bar(total, self.global_step)
        self.s.model.train()
        if start_link == 0 and self.global_step == 0:
            self.metrics.write({"type": "eval", "step": 0, "eval_loss": self.evaluate()})
        try:
            for link in range(start_link, rc.links):
                if self.s.chain.link != link:
                    self.s.chain.start_link(link, self.comm)
                t0 = time.perf_counter()
                loss = self._train_link(link)
                self._boundary(link, loss, time.perf_counter() - t0)
        finally:
            if self._bar is not None:
                self._bar.close()
            self.metrics.close()
        return self.history

    def _train_link(self, link: int) -> float:
        """K optimizer steps on the current sketch; returns the link's mean training loss."""
        rc, tc = self.cfg.raclora, self.cfg.train
        losses = []
        for k in range(rc.steps_per_link):
            lr = link_lr(tc, k, rc.steps_per_link)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = self._step()
            self.global_step += 1
            dt = time.perf_counter() - t0
            tokens = tc.batch_size * tc.grad_accum * self.data.train.shape[1]
            rec = {"type": "step", "step": self.global_step, "link": link, "loss": loss, "lr": lr,
                   "grad_norm": self._grad_norm, "tokens_per_s": tokens / dt, "rss_mb": rss_mb()}
            self.metrics.write(rec)
            losses.append(loss)
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(link=link, loss=f"{loss:.3f}")
            crash_after_step(self.global_step)
        return sum(losses) / len(losses)

    def _step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        tc = self.cfg.train
        total = 0.0
        for micro in range(tc.grad_accum):
            batch = self.data.train_batch(self.global_step * tc.grad_accum + micro)  # (B, T)
            loss = self.s.model(input_ids=batch, labels=batch).loss
            (loss / tc.grad_accum).backward()
            total += loss.item()
        clip = tc.grad_clip if tc.grad_clip is not None else float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / tc.grad_accum

    def _boundary(self, link: int, train_loss: float, link_time: float) -> None:
        """Guard + merge (in the chain), optimizer reset, eval, record, checkpoint."""
        chain, rc = self.s.chain, self.cfg.raclora
        record = chain.end_link(self.comm)
        if rc.optimizer_state == "reset":
            # Adam moments describe the old sketch's coordinates; they mean nothing in the
            # next link's subspace.
            self.optimizer.state.clear()
        rec = {**record.to_dict(), "train_loss": train_loss, "eval_loss": self.evaluate(),
               "link_time_s": link_time, "step": self.global_step}
        self.metrics.write(rec)
        self.history.append(rec)
        self.log(f"link {link + 1}/{rc.links}  train_loss {train_loss:.4f}  eval_loss "
                 f"{rec['eval_loss']:.4f}  |sBA| {record.update_norm:.4g}  "
                 f"merge {record.merge_time_s * 1e3:.1f} ms" + ("" if record.merged else "  (discarded)"))
        last = link + 1 == rc.links
        if last or (link + 1) % self.cfg.checkpoint.every_links == 0:
            self.checkpoint(link + 1)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed eval batches (NaN when there are none)."""
        batches = self.data.eval_batches(self.cfg.train.eval_batches)
        if not batches:
            return float("nan")
        self.s.model.eval()
        losses = [self.s.model(input_ids=b, labels=b).loss.item() for b in batches]
        self.s.model.train()
        return sum(losses) / len(losses)

    def checkpoint(self, next_link: int) -> Path:
        chain = self.s.chain
        meta = {"next_link": next_link, "global_step": self.global_step,
                "layers": [layer.spec.to_dict() for layer in self.s.layers.values()],
                "fingerprint_link": chain.link,
                "fingerprints": [str(x) for x in chain.fingerprints().tolist()]}
        return save_checkpoint(self.run_dir, self.s.chain.state, self.optimizer.state_dict(),
                               meta, self.cfg.checkpoint.keep)
