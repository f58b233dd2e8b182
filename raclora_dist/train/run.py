"""One training run end to end: check, prepare the run folder, (resume,) train, plot.

Everything that can fail on bad input (config, data, targets, rank) is checked before the
run folder is touched, so a failed start never damages an earlier run's files.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from raclora_dist.backends import Backend, make_backend
from raclora_dist.backends.dist import DistInfo, barrier, init_distributed, shutdown
from raclora_dist.checkpoint.folder import Checkpoint, damaged_checkpoints, find_latest, load_checkpoint
from raclora_dist.config import ConfigError, RunConfig, build_config, read_yaml
from raclora_dist.data.batches import PackedData, write_blocks
from raclora_dist.data.token_cache import cached_blocks
from raclora_dist.data.tokenizer import load_tokenizer, tokenizer_source
from raclora_dist.files import write_atomic
from raclora_dist.logs import console_on, rank_only
from raclora_dist.model.session import Session, base_folder, build_session, import_libraries, validate_model
from raclora_dist.observe.metrics import current_rss_mb, device_peak_mb, peak_rss_mb, truncate_after
from raclora_dist.observe.runs import running
from raclora_dist.train.callbacks import Callback, load_callbacks
from raclora_dist.train.checks import check_paths, diff_configs
from raclora_dist.train.loop import Trainer

logger = logging.getLogger(__name__)


def load_data(cfg: RunConfig) -> PackedData:
    """``data.path``'s packed blocks: memory-mapped from the tokenized cache, which is built
    first (read, rendered, tokenized, packed; logged) if this data has none."""
    tok = load_tokenizer(tokenizer_source(cfg))
    sets = cached_blocks(cfg.data, tok, lambda folder: write_blocks(cfg.data, tok, folder))
    return PackedData(sets["train"], cfg.data.eval_fraction, cfg.train.batch_size, cfg.train.seed,
                      eval_blocks=sets.get("eval"))


def _check_resume(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    ckpt = find_latest(run_dir, report=logger.warning)
    damaged = damaged_checkpoints(run_dir)
    if resume and ckpt is None:
        if damaged:
            listed = "; ".join(f"{name}: {', '.join(p)}" for name, p in damaged.items())
            raise ConfigError(f"--resume: every checkpoint in run folder {str(run_dir)!r} is damaged ({listed})")
        raise ConfigError(f"--resume: no complete checkpoint in run folder {str(run_dir)!r}")
    if not resume and (ckpt is not None or damaged):
        raise ConfigError(
            f"run.dir: {str(run_dir)!r} already holds a checkpoint; pass --resume to continue "
            "that run, or set run.dir to a new folder"
        )
    if resume and ckpt is not None:  # (resume without a checkpoint was refused above)
        for saved_path in (run_dir / "config.yaml", ckpt / "config.yaml"):  # the run's, and the checkpoint's own
            if not saved_path.is_file():
                continue
            saved = build_config(read_yaml(saved_path), str(saved_path), saved=True)
            diffs = diff_configs(saved, cfg)
            if diffs:
                whose = "the run's" if saved_path.parent == run_dir else f"that of checkpoint {ckpt.name}"
                raise ConfigError(f"--resume: the config differs from {whose}:\n  " + "\n  ".join(diffs))
    return ckpt


def build_callbacks(cfg: RunConfig) -> list[Callback]:
    """The config's ``run.callbacks``, imported and built (a bad one is a config error)."""
    try:
        return load_callbacks(cfg.run.callbacks)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    write_atomic(run_dir / "config.yaml", cfg.to_yaml())


def preflight(cfg: RunConfig, resume: bool) -> None:
    """What the launching process checks before it starts any worker (torchrun's): the run
    folder against ``--resume``, the config against the run's, the world size against the
    checkpoint, and the data (read, rendered and tokenized: a bad row is named here). Each
    worker checks the same again (a worker may see other files).

    Raises:
        ConfigError: the run cannot start; nothing was started or written.
    """
    with console_on(sys.stderr):  # ahead of the run's own report on stdout
        ckpt_path = _check_resume(cfg, cfg.run.path, resume)
        _check_checkpoint_world(cfg, cfg.distributed.workers, ckpt_path)
        load_data(cfg)  # tokenized here, once: workers map it


def _check_world(cfg: RunConfig, info: DistInfo, ckpt_path: Path | None) -> None:
    if info.world_size != cfg.distributed.workers:
        raise ConfigError(
            f"distributed.workers={cfg.distributed.workers} but the launcher started "
            f"{info.world_size} processes (WORLD_SIZE)"
        )
    _check_checkpoint_world(cfg, info.world_size, ckpt_path)


def _check_checkpoint_world(cfg: RunConfig, world_size: int, ckpt_path: Path | None) -> None:
    if ckpt_path is not None:
        import json

        meta = json.loads((ckpt_path / "meta.json").read_text())
        d = cfg.distributed
        if meta.get("sync") == "link" and meta.get("step_in_link") and (
            meta.get("world_size"), meta.get("sync_groups"), "link", meta.get("strategy")
        ) != (world_size, d.sync_groups, d.sync, d.strategy):
            raise ConfigError(
                f"--resume: {ckpt_path.name} is mid-link under distributed.sync: link with {meta.get('strategy')}, "
                f"{meta.get('world_size')} workers and sync_groups {meta.get('sync_groups')}: each group's factors so "
                "far resume only with the same distributed.sync, strategy, workers and sync_groups (or resume from "
                "a boundary checkpoint)")
        was_ds, is_ds = meta.get("strategy") == "deepspeed", cfg.distributed.strategy == "deepspeed"
        if (was_ds or is_ds) and (meta.get("strategy"), meta.get("world_size")) != (
            cfg.distributed.strategy, world_size
        ):
            raise ConfigError(
                f"--resume: {ckpt_path.name} was written by {meta.get('strategy')} with "
                f"{meta.get('world_size')} workers; DeepSpeed state resumes only with the same "
                "strategy and distributed.workers"
            )


def run_training(cfg: RunConfig, resume: bool = False,
                 on_checkpoint: Callable[[Path | None, dict], None] | None = None) -> list[dict]:
    """Trains ``cfg`` into ``cfg.run.dir`` on this rank; returns the link records.

    Under torchrun or Ray Train every rank calls this; rank 0 alone writes the run folder.

    Args:
        cfg: the run config. resume: continue from the run folder's latest checkpoint.
        on_checkpoint: called on every rank after each checkpoint with its folder and the
            link record (Ray Train reports it to storage).
    """
    run_dir = cfg.run.path
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.distributed.backend) if cfg.distributed.strategy != "single" else DistInfo()
    try:
        rank_only(info.is_main)  # progress lines from rank 0 alone
        return _run(cfg, run_dir, info, resume, on_checkpoint)
    finally:
        if owns_group:  # Ray Train made the group and tears it down itself
            # Free the engine's wrappers (DDP's reducer, gloo work objects held in reference
            # cycles) while the group is alive: collected after it, at interpreter exit, they
            # can abort the process ("terminate called without an active exception").
            gc.collect()
            shutdown()


@dataclass
class _Prepared:
    """What the checks established before anything is written."""

    t_start: float  # time.perf_counter() at the run's start
    rss_start: float  # MiB, once the libraries are imported: the baseline the model is measured from
    ckpt_path: Path | None  # the checkpoint to resume from
    data: PackedData
    callbacks: list[Callback]


@dataclass
class _Built:
    """The loaded run: the session on its engine, and what loading it cost."""

    session: Session
    backend: Backend
    ckpt: Checkpoint | None
    startup: dict  # Trainer's start-up report: load time and memory


def _run(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool,
         on_checkpoint: Callable[[Path | None, dict], None] | None) -> list[dict]:
    """One run on this rank: prepare (checks; nothing written), build (the run folder, the base
    on its engine), restore (a checkpoint's state), fit, finish (plot, trackers)."""
    prep = _prepare(cfg, run_dir, info, resume)
    built = _build(cfg, run_dir, info, prep)
    # `raclora runs` shows the run as running until this block ends, however it ends
    with running(run_dir) if info.is_main else contextlib.nullcontext():
        ckpt = built.ckpt
        if info.is_main and ckpt is not None:
            truncate_after(run_dir, ckpt.global_step, ckpt.next_link)
        trackers = _trackers(cfg, run_dir) if info.is_main and cfg.run.trackers else None
        # (after the truncation: the trackers continue from the checkpoint)
        trainer = Trainer(cfg, built.session, prep.data, run_dir, built.backend, on_checkpoint=on_checkpoint,
                          startup=built.startup, callbacks=[*prep.callbacks, *([trackers] if trackers else [])])
        start_link, start_step = trainer.restore(ckpt) if ckpt is not None else (0, 0)
        logger.info(f"training {len(built.session.layers)} layers, {built.session.chain.num_trainable():,} trainable "
                    f"parameters per link, {cfg.raclora.links} links x {cfg.raclora.steps_per_link} steps, "
                    f"{cfg.distributed.strategy} x {info.world_size}")
        history = trainer.fit(start_link, start_step)
        if info.is_main:
            from raclora_dist.observe.plot import plot_run

            plot_run(run_dir)
            if trackers is not None:
                trackers.finish()
        barrier()
        return history


def _prepare(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool) -> _Prepared:
    """Every check a rank makes before the run folder is touched; the data, tokenized by rank 0
    (when the launching process has not) and mapped by the others."""
    t_start = time.perf_counter()
    check_paths(cfg)
    callbacks = build_callbacks(cfg)
    validate_model(cfg)  # targets and rank, on the meta device (imports the model's code)
    import_libraries(cfg)
    rss_start = current_rss_mb()  # after the libraries: the baseline the model is measured from
    ckpt_path = _check_resume(cfg, run_dir, resume)
    _check_world(cfg, info, ckpt_path)
    data = load_data(cfg) if info.is_main else None
    barrier()  # every rank passed the checks before anything is written
    return _Prepared(t_start, rss_start, ckpt_path, data or load_data(cfg), callbacks)


def _build(cfg: RunConfig, run_dir: Path, info: DistInfo, prep: _Prepared) -> _Built:
    """The run folder (rank 0), the base streamed onto the engine with the checkpoint's chain
    replayed, and the start-up figures so far."""
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    base = base_folder(cfg, run_dir)
    # A config-built base is a pure function of (config, init_seed): rebuild it when the
    # run folder lacks it (a fresh node resuming from remote storage) and save it again.
    fresh_base = cfg.model.config is not None and (prep.ckpt_path is None or not (base / "config.json").is_file())
    ckpt = load_checkpoint(prep.ckpt_path) if prep.ckpt_path is not None else None
    backend = make_backend(cfg, info)
    t_load, rss_before_load = time.perf_counter(), current_rss_mb()
    # Streamed part by part; a checkpoint's merges are replayed on each part before the
    # engine shards it, so the merges are the plain dense ones of one process.
    session = build_session(
        cfg, backend,
        source=base if cfg.model.config is not None and not fresh_base else None,
        save_base_to=base if fresh_base and info.is_main else None,
        ckpt=ckpt,
    )
    load_s, peak_loaded = time.perf_counter() - t_load, peak_rss_mb()
    if info.is_main:
        _write_config(cfg, run_dir)
    backend.setup(session.model)
    session.chain.access = backend.access
    startup = {"t_start": prep.t_start, "load_s": load_s, "rss_mb_start": prep.rss_start,
               "rss_mb_before_load": rss_before_load, "peak_rss_mb_loaded": peak_loaded}
    gpu_peak = device_peak_mb(info.device)
    if gpu_peak is not None:
        startup["gpu_peak_mb_loaded"] = gpu_peak
    logger.info(f"loaded the base in {load_s:.1f} s (peak RSS {peak_loaded:,.0f} MiB on rank 0)")
    return _Built(session, backend, ckpt, startup)


def _trackers(cfg: RunConfig, run_dir: Path):
    from raclora_dist.observe.trackers import Trackers

    r = cfg.run
    return Trackers(r.trackers, run_dir, cfg.model_dump(mode="json"), r.mlflow_tracking_uri, r.wandb_project,
                    r.wandb_mode)
