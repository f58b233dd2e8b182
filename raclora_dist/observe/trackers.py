"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed from ``metrics.jsonl``.

``run.trackers: [tensorboard, mlflow, wandb]`` (none by default). Each tracker's library is
imported only when named. Only rank 0 logs (the callback is built there alone).

What a tracker receives is what ``metrics.jsonl`` holds at each complete checkpoint: the
lines written since the last one are sent when a checkpoint is committed (and once more at
the end, with ``plot.png``). A crashed run's lines after its last checkpoint were never
sent, and the resumed run (whose ``metrics.jsonl`` is cut back to that checkpoint) sends
them anew, so no tracker sees a step twice. ``RUN/trackers.json`` keeps the number of lines
sent and each tracker's run id, so a resumed run, or a Ray worker group restarted on the same
run folder, continues the same tracker run.

* ``tensorboard``: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``);
* ``mlflow``: ``run.mlflow_tracking_uri``, default ``sqlite:///RUN/mlflow.db`` with artifacts in
  ``RUN/mlartifacts`` (works offline; MLflow's client and ``mlflow ui --backend-store-uri``
  open it with no setting: MLflow 3 keeps its file store behind an opt-in), experiment named
  after the run folder. Runs started before this default continue in their ``RUN/mlruns``;
* ``wandb``: ``wandb.init(mode=run.wandb_mode)``, offline by default (``RUN/wandb/``).

Step records give ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``
(and ``train/trained_tokens_per_s``); link records ``link/eval_loss``, ``link/train_loss``,
``link/update_norm``, ``link/landed_fraction``, ``link/merge_time_s``; the first eval
``eval/loss``. The resolved config is logged as parameters (flattened, ``section.field``),
with credentials redacted (:func:`redact`: the password of a URI, secret-looking query
parameters and fields).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from raclora_dist.files import write_atomic

STEP_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s")
LINK_KEYS = ("eval_loss", "train_loss", "update_norm", "landed_fraction", "merge_time_s")


def scalars(record: dict) -> tuple[int, dict[str, float]] | None:
    """``(step, {name: value})`` of a metrics record, or None for records without scalars."""
    kind = record.get("type")
    if kind == "step":
        return record["step"], {f"train/{k}": float(record[k]) for k in STEP_KEYS if k in record}
    if kind == "link":
        return record["step"], {f"link/{k}": float(record[k]) for k in LINK_KEYS if k in record}
    if kind == "eval":
        return record["step"], {"eval/loss": float(record["eval_loss"])}
    return None


REDACTED = "***"
# Field and query-parameter names whose values are credentials (AWS, GCS, Azure SAS, tokens).
SECRET_NAME = re.compile(r"(^|[_-])(password|passwd|secret|token|api[_-]key|access[_-]key|credentials?|signature|sig)"
                         r"($|[_-])", re.IGNORECASE)


def redact(value: Any, name: str = "") -> Any:
    """A config (or any value in it) with credentials replaced by ``***``, for trackers.

    Redacts: the password in a URI's userinfo (``scheme://user:PASS@host``, the user kept),
    query parameters with secret-looking names (``?token=``, ``X-Amz-Signature=``, ``sig=``),
    and whole values of fields so named. Returns a new object; ``value`` is not changed.
    """
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        if name and SECRET_NAME.search(name):
            return REDACTED
        return _redact_uri(value) if "://" in value or "@" in value else value
    return value


def redact_args(args: list[str]) -> list[str]:
    """Command-line arguments with credentials redacted: ``section.field=value`` overrides as
    :func:`redact` treats the field, other arguments as URIs."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={redact(value, key.rsplit('.', 1)[-1])}" if sep and not key.startswith("-")
                   else redact(arg))
    return out


def _redact_uri(text: str) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, sep, _ = user.partition(":")
        netloc = f"{name}:{REDACTED}@{host}" if sep else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if SECRET_NAME.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, state: dict, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "tensorboard" not in state:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
            state["tensorboard"] = True

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, run_dir: Path) -> None:
        plot = run_dir / "plot.png"
        if plot.is_file():
            import matplotlib.image

            self.writer.add_image("plot", matplotlib.image.imread(str(plot))[..., :3], dataformats="HWC")
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, state: dict, config: dict, uri: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        artifacts = None
        if uri is None and "mlflow_run_id" in state and "mlflow_store" not in state:
            # A run begun with the earlier default (MLflow's file store) continues there.
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif uri is None:
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            artifacts = (run_dir / "mlartifacts").resolve().as_uri()  # else MLflow's ./mlruns in the cwd
            state["mlflow_store"] = "sqlite"
        self.client = MlflowClient(tracking_uri=uri)
        if "mlflow_run_id" not in state:
            name = run_dir.resolve().name
            exp = self.client.get_experiment_by_name(name)
            exp_id = (exp.experiment_id if exp is not None
                      else self.client.create_experiment(name, artifact_location=artifacts))
            run = self.client.create_run(exp_id, run_name=name)
            state["mlflow_run_id"] = run.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        self.run_id = state["mlflow_run_id"]

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), v, now, step) for k, v in values.items()])

    def flush(self) -> None:
        pass

    def finish(self, run_dir: Path) -> None:
        if (run_dir / "plot.png").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "plot.png"))
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_dir: Path, state: dict, config: dict, project: str, mode: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        self.wandb = wandb
        # W&B records the command line with the run, and overrides on it may carry credentials.
        argv, sys.argv = sys.argv, [sys.argv[0], *redact_args(sys.argv[1:])]
        try:
            self.run = wandb.init(project=project, name=run_dir.resolve().name, id=state["wandb_id"], resume="allow",
                                  dir=str(run_dir), mode=mode, config=config)  # type: ignore[arg-type]  # a config Literal
        finally:
            sys.argv = argv

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def finish(self, run_dir: Path) -> None:
        if (run_dir / "plot.png").is_file():
            self.run.log({"plot": self.wandb.Image(str(run_dir / "plot.png"))})
        self.run.finish()


class Trackers:
    """Rank 0's trackers, fed from ``metrics.jsonl`` at each complete checkpoint: a callback of the
    run (``on_checkpoint``, the one hook it needs; see ``raclora_dist.train.callbacks``)."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict[str, Any], mlflow_uri: str | None = None,
                 wandb_project: str = "raclora", wandb_mode: str = "offline") -> None:
        self.run_dir = Path(run_dir)
        self.state_path = self.run_dir / "trackers.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"sent_lines": 0}
        self.trackers: list[TensorBoard | MLflow | WandB] = []
        config = redact(config)
        for name in names:
            if name == "tensorboard":
                self.trackers.append(TensorBoard(self.run_dir, self.state, config))
            elif name == "mlflow":
                self.trackers.append(MLflow(self.run_dir, self.state, config, mlflow_uri))
            elif name == "wandb":
                self.trackers.append(WandB(self.run_dir, self.state, config, wandb_project, wandb_mode))
        self._save()

    def _save(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state))

    def send(self) -> None:
        """Sends the lines of ``metrics.jsonl`` not sent yet (they are final: checkpointed)."""
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines[self.state["sent_lines"]:]:
            try:
                found = scalars(json.loads(line))
            except json.JSONDecodeError:
                continue
            if found is not None:
                for t in self.trackers:
                    t.log(*found)
        for t in self.trackers:
            t.flush()
        self.state["sent_lines"] = len(lines)
        self._save()

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        self.send()

    def finish(self) -> None:
        """The run ended: the last lines, ``plot.png``, and each tracker's run closed."""
        self.send()
        for t in self.trackers:
            t.finish(self.run_dir)
