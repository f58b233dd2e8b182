"""One training run end to end: check, prepare the run folder, (resume,) train, plot.

Everything that can fail on bad input (config, data, targets, rank) is checked before the
run folder is touched, so a failed start never damages an earlier run's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from raclora_dist.config import ConfigError, RunConfig, build_config, check_paths, diff_configs, read_yaml
from raclora_dist.train.checkpoint import Checkpoint, find_latest, load_checkpoint
from raclora_dist.train.data import PackedData, pack, read_documents
from raclora_dist.train.loop import Trainer
from raclora_dist.train.metrics import truncate_after
from raclora_dist.train.session import Session, base_folder, build_session, validate_model
from raclora_dist.train.tokenizer import load_tokenizer


def load_data(cfg: RunConfig) -> PackedData:
    """Reads, tokenizes and packs ``data.path``."""
    tok = load_tokenizer(cfg.data.tokenizer)
    blocks = pack(read_documents(cfg.data), tok, cfg.data.seq_len)
    return PackedData(blocks, cfg.data.eval_fraction, cfg.train.batch_size, cfg.train.seed)


def _check_resume(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    ckpt = find_latest(run_dir)
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no complete checkpoint in run folder {str(run_dir)!r}")
    if not resume and ckpt is not None:
        raise ConfigError(
            f"run.dir: {str(run_dir)!r} already holds a checkpoint; pass --resume to continue "
            "that run, or set run.dir to a new folder"
        )
    if resume:
        saved = build_config(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
        diffs = diff_configs(saved, cfg)
        if diffs:
            raise ConfigError("--resume: the config differs from the run's:\n  " + "\n  ".join(diffs))
    return ckpt


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, run_dir / "config.yaml")


def restore(session: Session, ckpt: Checkpoint, trainer: Trainer | None = None) -> None:
    """Replays a checkpoint's chain onto a fresh base, then starts its next link (in place).

    Raises:
        ConfigError: the regenerated sketches' fingerprints differ from the stored ones.
    """
    session.chain.replay(ckpt.chain)
    if trainer is not None:
        trainer.optimizer.load_state_dict(ckpt.optimizer)
        trainer.global_step = ckpt.global_step
        torch.set_rng_state(ckpt.rng)
    names = [d["name"] for d in ckpt.meta.get("layers", [])]
    if names != list(session.layers):
        raise ConfigError(f"{ckpt.path}: the checkpoint's layers differ from the model's targets")
    # Sketches are regenerated, not stored: check they are the ones the run trained with.
    link = ckpt.meta["fingerprint_link"]
    for layer in session.layers.values():
        layer.resample(link)
    session.chain.link = link
    got = [str(x) for x in session.chain.fingerprints().tolist()]
    bad = [n for n, a, b in zip(names, got, ckpt.meta["fingerprints"]) if a != b]
    if bad:
        raise ConfigError(
            f"{ckpt.path}: regenerated sketches of link {link} differ from the checkpoint's "
            f"(first: {bad[0]!r}); was raclora.seed or the sketch code changed?"
        )


def run_training(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Trains ``cfg`` into ``cfg.run.dir``; returns the link records of this invocation."""
    run_dir = Path(cfg.run.dir)
    check_paths(cfg)
    validate_model(cfg)  # targets and rank, on the meta device
    ckpt_path = _check_resume(cfg, run_dir, resume)
    data = load_data(cfg)
    # Inputs are good: from here on the run folder may be written.
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh_base = cfg.model.config is not None and ckpt_path is None
    base = base_folder(cfg, run_dir)
    session = build_session(
        cfg,
        source=base if cfg.model.config is not None and not fresh_base else None,
        save_base_to=base if fresh_base else None,
    )
    _write_config(cfg, run_dir)
    start_link = 0
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        truncate_after(run_dir, ckpt.global_step, ckpt.next_link)
    trainer = Trainer(cfg, session, data, run_dir, log=log)
    if ckpt_path is not None:
        restore(session, ckpt, trainer)
        start_link = ckpt.next_link
        log(f"resumed {run_dir} at link {start_link} (step {ckpt.global_step})")
    log(f"training {len(session.layers)} layers, {session.chain.num_trainable():,} trainable "
        f"parameters per link, {cfg.raclora.links} links x {cfg.raclora.steps_per_link} steps")
    history = trainer.fit(start_link)
    from raclora_dist.train.plot import plot_run

    plot_run(run_dir)
    return history
