"""Ray job submission: ``raclora submit/status/logs/stop`` over Ray's JobSubmissionClient.

Token authentication is Ray's own: with ``RAY_AUTH_MODE=token`` the client reads the token
from ``RAY_AUTH_TOKEN`` or the token file (``~/.ray/auth_token``); nothing here bypasses it.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

# What the job's working directory upload leaves out (the venv, runs, VCS metadata).
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "benchmarks/results", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
           submission_id: str | None = None, pip: list[str] | None = None) -> str:
    """Submits a training job with the working directory (config, data) uploaded; returns its id."""
    runtime_env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    return client(address).submit_job(entrypoint=entrypoint(config, overrides), runtime_env=runtime_env,
                                      submission_id=submission_id)


def follow(address: str, job_id: str, poll_s: float = 1.0) -> str:
    """Streams a job's logs to stdout until it ends; returns its final status."""
    c = client(address)
    seen = 0
    while True:
        s = c.get_job_status(job_id)
        status = str(getattr(s, "value", s))
        logs = c.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        sys.stdout.flush()
        seen = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


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
