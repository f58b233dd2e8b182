"""Ray job submission: ``raclora submit/status/logs/stop`` over Ray's JobSubmissionClient.

Token authentication is Ray's own: with ``RAY_AUTH_MODE=token`` the client reads the token
from ``RAY_AUTH_TOKEN`` or the token file (``~/.ray/auth_token``); nothing here bypasses it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# What the job's working directory upload leaves out (the venv, runs, VCS metadata).
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "benchmarks/results", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Ray's job server answers this (HTTP 500) until the head's job agent has registered, which
# takes a while after `ray start` on a loaded machine.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 120.0


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection or authentication: say what to check
        hint = ""
        if "auth" in str(err).lower() or "401" in str(err) or "403" in str(err):
            hint = " (token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or the cluster's token file)"
        raise ConnectionError(f"cannot reach the Ray job server at {address}: {err}{hint}") from err


def entrypoint(config: str, overrides: list[str]) -> str:
    """The job's command: exactly ``python -m raclora_dist train CONFIG [overrides]``."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "raclora_dist", "train", config, *overrides])


def submit(address: str, config: str, overrides: list[str], *, working_dir: str = ".",
           submission_id: str | None = None, pip: list[str] | None = None,
           agent_wait_s: float = AGENT_WAIT_S) -> str:
    """Submits a training job with the working directory (config, data) uploaded; returns its id.

    Ray's upload leaves out what ``.gitignore`` and ``.rayignore`` name (and :data:`EXCLUDES`).
    The files the config needs that they would leave out (generated data, a tokenizer) are
    uploaded anyway, through a staged copy of the working directory (:func:`stage_upload`).
    While the head's job agent is still starting (Ray answers "No available agent"), the
    submission is retried for up to ``agent_wait_s`` seconds, with a line saying so.

    Raises:
        ConfigError: a file the config needs cannot reach the job (see :func:`stage_upload`).
        ConnectionError: no job agent came up on the head within ``agent_wait_s``.
    """
    with tempfile.TemporaryDirectory(prefix="raclora-upload-") as tmp:
        upload, added = stage_upload(Path(working_dir), config, overrides, Path(tmp))
        for rel in added:
            logger.info(f"uploading {rel} too: the config needs it, and .gitignore/.rayignore would leave it out")
        runtime_env: dict = {"working_dir": str(upload), "excludes": EXCLUDES}
        if pip:
            runtime_env["pip"] = pip
        jobs = client(address)
        deadline, said = time.monotonic() + agent_wait_s, False
        while True:
            try:
                return jobs.submit_job(entrypoint=entrypoint(config, overrides), runtime_env=runtime_env,
                                       submission_id=submission_id)
            except RuntimeError as err:
                if NO_AGENT not in str(err):
                    raise
                if not said:
                    logger.info(f"waiting for the head's job agent (Ray: {NO_AGENT}); retrying for up to "
                        f"{agent_wait_s:.0f} s")
                    said = True
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"the Ray head at {address} has no job agent after {agent_wait_s:.0f} s "
                                          f"(it answers: {NO_AGENT}); check the head's dashboard_agent.log") from None
                time.sleep(2.0)


def uploaded_files(root: Path) -> set[Path]:
    """The files Ray would upload from ``root`` as a job's working directory (resolved paths):
    Ray's own traversal, with its ``.gitignore``/``.rayignore`` handling and :data:`EXCLUDES`."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.resolve()
    found: list[Path] = []
    _dir_travel(root, [_get_excludes(root, EXCLUDES)], found.append, include_gitignore=True)
    return {p.resolve() for p in found if p.is_file()}


def _needed(config: str, overrides: list[str], root: Path) -> list[tuple[str, Path]]:
    """``(field, path)`` of every local file or folder the config names inside ``root``."""
    from raclora_dist.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError:
        return []  # the job reports it, with the field named, in its logs
    from raclora_dist.data.sources import kind

    fields = [("the config", config), *[("data.path", p) for p in cfg.data.paths if kind(p) == "path"],
              *[("data.eval_path", p) for p in cfg.data.eval_paths if kind(p) == "path"]]

    if cfg.data.tokenizer not in (None, "bytes") and kind(cfg.data.tokenizer) == "path":
        fields.append(("data.tokenizer", cfg.data.tokenizer))
    if cfg.model.name_or_path is not None and kind(cfg.model.name_or_path) == "path":  # not a Hub name or URI
        fields.append(("model.name_or_path", cfg.model.name_or_path))
    out = []
    for field, value in fields:
        path = (root / value).resolve()  # the job resolves relative paths in the working dir
        if Path(value).is_absolute() and not path.is_relative_to(root):
            continue  # a path on the cluster: only the job can check it
        if not path.is_relative_to(root):
            raise ConfigError(f"{field}: {value!r} is outside the working directory {root}, which is all the "
                              "job receives; move it in, or give the absolute path where the cluster sees it")
        out.append((field, path))
    return out


def stage_upload(working_dir: Path, config: str, overrides: list[str], stage: Path) -> tuple[Path, list[str]]:
    """What to upload so that the job finds every file the config needs.

    Returns ``working_dir`` itself when Ray's upload holds them all; otherwise a copy in
    ``stage`` of what Ray would upload plus the missing files, with their relative paths.
    A model folder is never added this way (checkpoints are large; the cluster should see
    it at an absolute path).

    Raises:
        ConfigError: a needed file is missing, or is a model folder Ray would leave out.
    """
    from raclora_dist.config import ConfigError

    root = working_dir.resolve()
    kept = uploaded_files(root)
    missing: list[Path] = []
    for field, path in _needed(config, overrides, root):
        files = [path] if path.is_file() else sorted(p.resolve() for p in path.rglob("*") if p.is_file())
        if not files:
            raise ConfigError(f"{field}: {str(path.relative_to(root))!r} does not exist in the working directory {root}")
        left_out = [f for f in files if f not in kept]
        if left_out and field == "model.name_or_path":
            raise ConfigError(f"model.name_or_path: {str(path.relative_to(root))!r} is left out of the job's upload "
                              "(.gitignore or .rayignore); give the absolute path where the cluster's nodes see it")
        missing += left_out
    if not missing:
        return working_dir, []
    for f in sorted(kept | set(missing)):
        if f.name in (".gitignore", ".rayignore"):
            continue  # the staged copy is filtered already
        dest = stage / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest)
        except OSError:  # another file system
            shutil.copy2(f, dest)
    return stage, [str(f.relative_to(root)) for f in missing]


def follow(address: str, job_id: str) -> str:
    """Streams a job's logs to stdout as the job writes them, until it ends; returns its final
    status. Ray's log tail (a websocket, with the client's authentication headers) sends each
    new chunk once and closes when the job reaches a terminal state."""
    import asyncio

    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    while True:  # the tail closes as the job ends; its status may be written a moment later
        s = c.get_job_status(job_id)
        status = str(getattr(s, "value", s))
        if status in TERMINAL:
            return status
        time.sleep(0.5)


def status(address: str, job_id: str) -> str:
    s = client(address).get_job_status(job_id)
    return str(getattr(s, "value", s))


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def default_working_dir(config: str) -> str:
    """The current directory, which must contain the config (it is uploaded with the job)."""
    cfg = Path(config).resolve()
    cwd = Path.cwd().resolve()
    if cwd not in cfg.parents:
        raise ValueError(f"config {config!r} must be inside the working directory {cwd} (it is uploaded with the job)")
    return str(cwd)
