"""Ray Train: the same training loop in each Ray worker (the only package importing ray).

The driver builds a ``TorchTrainer`` from the run config; each worker rebuilds the typed
config and calls :func:`raclora_dist.train.run.run_training`, exactly what torchrun runs.
Checkpoints taken at link boundaries are reported to Ray, which copies them to
``ray.storage_path``. When Ray restarts the worker group (a lost worker, within
``ray.max_failures``) or the driver is started again with the same ``ray.name`` and
storage, each worker gets the latest reported checkpoint back and resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from raclora_dist.checkpoint.folder import symlinks_in, verify_checkpoint
from raclora_dist.config import RunConfig
from raclora_dist.logs import console


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A Ray worker: resume from Ray's latest checkpoint if there is one, then train."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raclora_dist.backends.dist import NODE_ENV, shared_token
    from raclora_dist.checkpoint.folder import find_latest, install_on_every_disk
    from raclora_dist.train.run import run_training

    cfg = at_size(RunConfig.model_validate(config["cfg"]), ray.train.get_context().get_world_size())
    rank = ray.train.get_context().get_world_rank()
    # The node, for telling traffic across nodes from traffic inside one: Ray's node id (its
    # LOCAL_WORLD_SIZE counts the workers per IP address, which several raylets may share).
    os.environ[NODE_ENV] = ray.get_runtime_context().get_node_id()
    resume = bool(config.get("resume"))
    ckpt = ray.train.get_checkpoint()
    stored = config.get("resume_from")
    if ckpt is None:
        # Ray registers a reported checkpoint after its upload, asynchronously: a node lost in
        # between leaves a complete checkpoint in storage that Ray hands to no one (seen when a
        # node died one step after a checkpoint). Storage is shared by every rank, so each finds
        # the same newest intact one; it is this run's own (a checkpoint there when the driver
        # started was resumed from, or refused, by the driver).
        stored = latest_in_storage(cfg) or stored
    if ckpt is not None or stored:
        # Rank 0's run folder gets the checkpoint, and so does every other disk a rank is on
        # (a node with a disk of its own resumes its ranks' partitions from its own copy).
        if ckpt is None and stored is not None and "://" in stored:  # an object store: Ray downloads it
            ckpt = ray.train.Checkpoint(stored)
        with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(str(stored)) as folder:
            install_on_every_disk(Path(folder), cfg.run.path, rank, shared_token(), dist.barrier)
        resume = True
    elif config.get("started_fresh") and not resume:
        # A restarted worker group that Ray handed no checkpoint: a worker died after rank 0
        # had written a checkpoint into the run folder but before every worker's report of
        # it completed. The folder was empty when this run started, so that checkpoint is
        # this run's own: resume from it (if every rank can see it) instead of refusing it.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        seen = torch.tensor([int(find_latest(cfg.run.path) is not None)], device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        resume = bool(seen.item())

    def report(folder: Path | None, record: dict) -> None:
        # Every worker reports (a Ray Train sync point) with what only it can hand over: rank
        # 0 the checkpoint, the first rank of a node with its own disk that node's part (Ray
        # uploads every worker's folder into the same storage checkpoint), the others nothing.
        # a link's line at a boundary; a step's mid-link (its loss, no eval)
        metrics = {k: record[k] for k in ("link", "step", "train_loss", "loss", "eval_loss", "update_norm") if k in record}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)

    console()  # this worker's progress lines on its stdout, which Ray streams to the driver
    run_training(cfg, resume=resume, on_checkpoint=report)


def at_size(cfg: RunConfig, workers: int) -> RunConfig:
    """``cfg`` for a worker group of ``workers`` (an elastic run, ``ray.min_workers``, started
    it with fewer than ``distributed.workers``, or grew it back): the number of HSDP replicas
    or link-sync groups follows, each group keeping its size; everything else, the global batch
    included, stays. ``cfg`` itself when the size is the configured one.

    Raises:
        ConfigError: ``workers`` is not a size the config allows (not whole groups).
    """
    from raclora_dist.config import ConfigError, with_values

    d = cfg.distributed
    if workers == d.workers:
        return cfg
    if workers not in cfg.elastic_sizes():
        raise ConfigError(f"Ray Train started {workers} workers; this run takes "
                          f"{', '.join(map(str, cfg.elastic_sizes()))} (distributed.workers, ray.min_workers, groups)")
    size = cfg.group_size()
    changes: dict[str, Any] = {"distributed.workers": workers}
    if d.replicas > 1:
        changes["distributed.replicas"] = workers // size
    if d.sync == "link" and d.sync_groups:
        changes["distributed.sync_groups"] = workers // size
    return with_values(cfg, changes, source=f"an elastic group of {workers} workers")


def latest_in_storage(cfg: RunConfig) -> str | None:
    """The newest intact raclora checkpoint this run (same name) left in Ray storage: a local
    folder, or a URI when storage is an object store (``s3://``, ``gs://``, ``file://``...).

    Ray hands a restarted worker group its latest checkpoint itself; a driver started again
    after a *failed* run (a new Ray cluster: a RayJob's retry) gets none back, so the driver
    looks in storage too. Candidates are tried newest first and the first intact one wins: a
    damaged copy (a partial upload, a bad disk) is passed over for the one before it, as
    :func:`find_latest` does in the run folder. A remote candidate is downloaded to be
    checked (RAC-LoRA checkpoints hold the chain's factors and optimizer state, not the base).
    """
    if cfg.ray.storage_path is None:
        return None
    if "://" in cfg.ray.storage_path:
        return _latest_in_remote_storage(cfg.ray.storage_path.rstrip("/") + "/" + str(cfg.ray.name))
    root = Path(cfg.ray.storage_path) / str(cfg.ray.name)
    for folder in _newest_first((meta.parent, meta.read_text) for meta in root.glob("checkpoint_*/meta.json")):
        if not verify_checkpoint(folder) and not symlinks_in(folder):
            return str(folder)
    return None


def _newest_first(candidates) -> list:
    """``(where, read_meta)`` pairs -> ``where`` of those whose meta.json parses, newest
    (highest global step) first; others are not checkpoints of ours, or half written."""
    found = []
    for where, read in candidates:
        try:
            found.append((int(json.loads(read())["global_step"]), where))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [where for _, where in sorted(found, key=lambda x: x[0], reverse=True)]


def _latest_in_remote_storage(root_uri: str) -> str | None:
    import tempfile

    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(root_uri)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = [e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]

    def reader(name: str):
        return lambda: filesystem.open_input_stream(f"{root}/{name}/meta.json").read().decode()

    for name in _newest_first((n, reader(n)) for n in names):
        with tempfile.TemporaryDirectory(prefix="raclora-verify-") as tmp:
            try:
                pafs.copy_files(f"{root}/{name}", tmp, source_filesystem=filesystem)
            except OSError:
                continue
            if not verify_checkpoint(Path(tmp)) and not symlinks_in(Path(tmp)):
                return f"{root_uri}/{name}"
    return None


def fit(cfg: RunConfig, resume: bool = False, quiet: bool = False):
    """Runs ``cfg`` under Ray Train from the driver; returns Ray's ``Result``.

    Starts an embedded local Ray (dashboard off, or bound to 127.0.0.1) unless
    ``ray.address`` names a cluster or this process is already connected (a Ray job).

    Args:
        quiet: turn Ray's own output down through its settings (its loggers at ERROR,
            Ray Train's at WARNING, and with an embedded Ray, whose run folder is on this
            machine, the workers' output kept in Ray's log files: the caller follows
            ``metrics.jsonl`` instead, :class:`raclora_dist.observe.progress.Follower`).

    Raises:
        RuntimeError: the run failed after Ray's allowed restarts (the worker error attached).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    quiet_init = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR")} if quiet else {}
    if not ray.is_initialized():
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            # a cluster (inside a Ray job, RAY_ADDRESS names it): the workers' lines are the log
            ray.init(address=cfg.ray.address, **quiet_init)
        else:
            # address="local": always a new Ray of this process's own. With no address, Ray joins
            # the cluster that `ray start` last left on this machine (its temp folder names it),
            # where a head with no CPUs for our workers leaves the run waiting forever.
            poll_often_on_one_machine()
            ray.init(address="local", include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1",
                     log_to_driver=not quiet, **quiet_init)
    from raclora_dist.checkpoint.folder import find_latest

    _check_storage_reaches_every_node(cfg, len([n for n in ray.nodes() if n["Alive"]]))
    stored = latest_in_storage(cfg)
    workers: int | tuple[int, int] = cfg.distributed.workers
    elastic = {}
    if cfg.ray.min_workers is not None:  # Ray Train's elastic group: (min, max)
        workers = (cfg.ray.min_workers, cfg.distributed.workers)
        elastic = {"elastic_resize_monitor_interval_s": cfg.ray.resize_check_s}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume,
                           "resume_from": str(stored) if stored else None,
                           "started_fresh": find_latest(cfg.run.path) is None},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=dict(cfg.ray.resources_per_worker),
                                     placement_strategy=cfg.ray.placement_strategy, **elastic),
        run_config=RayRunConfig(
            name=cfg.ray.name, storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {cfg.ray.name!r} failed: {result.error}") from result.error
    if result.checkpoint is not None:
        bring_home(result.checkpoint, cfg.run.path)
    return result


POLL_ENV, EMBEDDED_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def poll_often_on_one_machine() -> None:
    """Sets how often Ray Train's controller polls its workers, for a Ray this process starts
    (its processes inherit this environment), unless the user set it. Ray's default, every 2 s,
    suits a cluster; finishing a run takes several polls, which kept an embedded run of the tiny
    test model going 6.4 s after its last link (0.8 s at 0.25 s). A poll is a local call here.
    A poll that misses its interval is waited on, not counted as a failure (10 minutes are)."""
    os.environ.setdefault(POLL_ENV, EMBEDDED_POLL_S)


def _check_storage_reaches_every_node(cfg: RunConfig, nodes: int) -> None:
    """Refuses the default storage (the run folder, a node's own disk) on a cluster of several
    nodes: each worker would upload to the disk of the node it runs on."""
    from raclora_dist.config import ConfigError

    if nodes > 1 and cfg.ray.storage_path == str(cfg.run.path / "ray"):
        raise ConfigError(
            f"ray.storage_path: this Ray cluster has {nodes} nodes, and the default storage "
            f"({cfg.ray.storage_path}, inside the run folder) is each node's own disk; set it to "
            "storage every node reaches: a URI (s3://..., gs://...) or a folder on a filesystem "
            "mounted on every node (NFS)"
        )


def bring_home(checkpoint, run_dir: Path) -> None:
    """Installs the run's final checkpoint from storage into the driver's run folder when it is
    not there (the driver's node is not rank 0's), so that the folder the user started from
    holds the result -- chain, metrics, config -- whichever nodes trained it.

    Args:
        checkpoint: the ``ray.train.Checkpoint`` Ray returned. run_dir: the driver's run folder.
    """
    from raclora_dist.checkpoint.folder import checkpoint_name, install_checkpoint, latest_name

    with checkpoint.as_directory() as folder:
        if latest_name(run_dir) != checkpoint_name(Path(folder)):
            install_checkpoint(Path(folder), run_dir)
