"""The run config: one YAML file, validated on load, with dotted command-line overrides.

Each layer of the system owns its section (``raclora`` comes from ``core``); this module
composes them and turns every validation failure into a :class:`ConfigError` that names
the field, the bad value and what is allowed. Reading the file and merging overrides is
``config_files``; how a saved config's version reads is ``config_version``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raclora_dist.config_files import ConfigError, deep_merge, expand_shorthands, parse_overrides, read_yaml
from raclora_dist.config_version import CONFIG_VERSION, as_saved_before_versions, read_version
from raclora_dist.core.config import RacLoraConfig
from raclora_dist.quant.config import QuantizationConfig

# fsdp_unit auto: the block size from which CPU workers gather sublayers (a block this large is
# gathered into maps of its own, model.heap.STEADY_MMAP_THRESHOLD; smaller ones are toys)
AUTO_SUBLAYER_BYTES = 8 << 20


class _Section(BaseModel):
    # frozen: a validated config cannot be edited into an invalid one; changes go through
    # with_values, which validates the whole config again.
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    dir: str | None = Field(None, description="Run folder; default runs/<config file name>.")
    callbacks: list[str | dict[str, Any]] = Field(
        default_factory=list, description="Training-loop callbacks built in every worker: 'package.module:Class' or "
        "{class: 'package.module:Class', args: {...}} (raclora_dist.train.callbacks.Callback).")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers fed by rank 0 at each checkpoint (TensorBoard event files "
        "in RUN/tensorboard, MLflow, W&B); each library is imported only when named.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///RUN/mlflow.db (artifacts in RUN/mlartifacts), which "
        "MLflow's client and UI open as is.")
    wandb_project: str = Field("raclora", description="W&B project.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode (offline: RUN/wandb, "
                                                                 "sync later with `wandb sync`).")

    @property
    def path(self) -> Path:
        """``dir`` as a Path (load_config sets ``dir`` when the file omits it)."""
        if self.dir is None:
            raise ConfigError("run.dir: not set")
        return Path(self.dir)


class ModelSection(_Section):
    name_or_path: str | None = Field(
        None, description="A pretrained model: a local folder of safetensors, a Hugging Face Hub name "
        "(org/name or org/name@revision, through the HF cache: HF_HOME, HF_HUB_OFFLINE, HF_TOKEN), or a folder in "
        "object storage (s3://, gs://, any pyarrow URI; fetched once per machine into $RACLORA_MODEL_CACHE).")
    config: dict[str, Any] | None = Field(
        None, description="A transformers config (with model_type) to build a fresh model from.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Base weight dtype.")
    init_seed: int = Field(0, description="Seed for a model built from config.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig,
        description="Hold the base's linear layers in 4 bits (bitsandbytes); 'nf4' is short for {method: nf4}.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path and model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (e.g. llama)")
        return self

_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


class DataSection(_Section):
    path: str | list[str] = Field(
        ..., description="Training data, read through Hugging Face datasets: a .jsonl/.json/.parquet/.csv/.txt file "
        "(.txt: blank-line separated documents), a folder of such files, a save_to_disk folder, or a Hugging Face Hub "
        "dataset (org/name[@revision], its data files of data.split, through the HF cache); or a list of these "
        "(sources, mixed by data.weights).")
    weights: list[float] | None = Field(
        None, description="With several data.path sources: their shares of the training examples (normalised); each "
        "source contributes its first rows in proportion until one runs out. Unset: all rows of every source.")
    eval_path: str | list[str] | None = Field(
        None, description="Held-out data in the same format (then data.eval_fraction is not used); unset: the last "
        "data.eval_fraction of the packed training sequences.")
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached (memory-mapped by every rank; built once per data, format "
        "and tokenizer); default $RACLORA_CACHE or ~/.cache/raclora/tokenized.")
    format: Literal["auto", "text", "jsonl", "instruction", "chat"] = Field(
        "auto", description="text: raw text, packed across documents, loss on every token; instruction: Alpaca rows "
        "(instruction, optional input, output); chat: rows of messages [{role, content}]; auto: chat if the rows have "
        "messages_field, instruction if they have instruction_field and output_field, else text. jsonl: same as text.")
    split: str = Field("train", description="The split of a dataset folder that has several (save_to_disk DatasetDict).")
    text_field: str = Field("text", description="text format: the field holding the text.")
    instruction_field: str = Field("instruction", description="instruction format: the field holding the instruction.")
    input_field: str = Field("input", description="instruction format: the optional field holding the input.")
    output_field: str = Field("output", description="instruction format: the field holding the response.")
    messages_field: str = Field("messages", description="chat format: the field holding the list of messages.")
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: dict(_ROLES),
        description="chat format: the dataset's role names -> system/user/assistant (ShareGPT's human/gpt included).")
    chat_template: str | None = Field(
        None, description="chat/instruction format: a Jinja chat template, or 'chatml', used when the tokenizer has none "
        "(a tokenizer's own template wins unless this is set).")
    train_on_prompt: bool = Field(False, description="instruction/chat: also train on prompt tokens (default: loss "
                                  "only on responses, label -100 elsewhere).")
    overlong: Literal["error", "truncate", "drop"] = Field(
        "error", description="instruction/chat: an example longer than seq_len is an error, cut to seq_len, or skipped.")
    tokenizer: str | None = Field(None, description="'bytes' (built-in byte-level) or a tokenizer folder; default: "
                                  "model.name_or_path's own tokenizer if that folder has one, else 'bytes'.")
    seq_len: int = Field(128, ge=8, description="Tokens per packed sequence.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of packed sequences held out.")
    max_documents: int | None = Field(None, ge=1, description="Use only the first N documents (rows) of each source.")
    num_proc: int = Field(1, ge=1, description="Processes that render and tokenize instruction/chat rows (datasets.map).")

    @model_validator(mode="after")
    def _weights_match_sources(self) -> DataSection:
        if self.weights is not None:
            n = len(self.path) if isinstance(self.path, list) else 1
            if len(self.weights) != n or any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                raise ValueError(f"data.weights: {self.weights} must be {n} non-negative numbers (one per data.path "
                                 "source), not all zero")
        if isinstance(self.path, list) and not self.path:
            raise ValueError("data.path: an empty list; give a file or folder, or a list of them")
        return self

    @property
    def paths(self) -> list[str]:
        """The training sources, as a list."""
        return list(self.path) if isinstance(self.path, list) else [self.path]

    @property
    def eval_paths(self) -> list[str]:
        """The held-out sources, as a list (empty: split from the training data)."""
        if self.eval_path is None:
            return []
        return list(self.eval_path) if isinstance(self.eval_path, list) else [self.eval_path]


class TrainSection(_Section):
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer of the trainable factor.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of each link.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay on the factor (biases toward small updates).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up at the start of every link.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay within a link.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="LR at the end of a link, relative to lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm; null disables.")
    eval_batches: int = Field(4, ge=0, description="Eval micro-batches after every link (0: none).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder block's activations in the backward instead of keeping them "
        "(non-reentrant torch.utils.checkpoint per block): saved activations shrink to one hidden state per block.")
    sample_prompts: list[str] = Field(
        default_factory=list, description="Prompts answered greedily after each link (and before the first), written "
        "to metrics.jsonl and samples.md; for instruction/chat data rendered as a user turn with the chat template.")
    sample_tokens: int = Field(48, ge=1, description="Tokens generated per sample prompt.")
    seed: int = Field(0, description="Data order seed.")


class CheckpointSection(_Section):
    every_links: int = Field(1, ge=1, description="Checkpoint every N links (and always at the end).")
    every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps inside a link (resumable mid-link).")
    keep: int = Field(2, ge=1, description="How many checkpoints to keep.")


class DistributedSection(_Section):
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = Field(
        "single", description="One process, or a data-parallel / sharded engine over workers.")
    workers: int = Field(1, ge=1, description="Processes (one per GPU, or CPU workers); >1 needs an engine.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Collectives: auto = nccl on GPU, gloo on CPU.")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16 parameters with fp32 reduction (fsdp2) or DeepSpeed bf16; none = fp32 (CPU default).")
    cpu_offload: bool = Field(
        False, description="fsdp2: keep parameter shards, gradients and the optimizer step in CPU memory "
        "(torch CPUOffloadPolicy). For deepspeed, set offload_optimizer / offload_param in distributed.deepspeed.")
    fsdp_unit: Literal["auto", "block", "sublayer", "linear"] = Field(
        "auto", description="fsdp2: what one all-gather brings in: a decoder block (fewest collectives), each "
        "of its sublayers apart (attention, MLP), or each of its linear layers apart (less in flight at the peak, "
        "more collectives). auto: sublayer on CPU workers for blocks of 8 MiB and more, else block "
        "(docs/distributed.md).")
    vocab_parallel: bool = Field(
        True, description="fsdp2 and ZeRO-3 with several workers: split a frozen untied input embedding and "
        "output head by vocabulary rows across ranks, for good, instead of sharding them and gathering each "
        "whole for every forward (the hidden states travel instead; docs/distributed.md).")
    deepspeed: dict[str, Any] = Field(
        default_factory=lambda: {"zero_optimization": {"stage": 2}},
        description="DeepSpeed config passed through; batch sizes and clipping filled from train.* if unset.")
    replicas: int = Field(
        1, ge=1, description="fsdp2: HSDP. The workers form this many replica groups of contiguous ranks (one per "
        "node); each group holds the model sharded over its own ranks, and gradients are reduced across groups "
        "(a 2-D device mesh). The per-step gathers then stay inside a node (docs/distributed.md). 1: shard "
        "over every worker.")
    sync: Literal["step", "link"] = Field(
        "step", description="step: gradients are averaged at every optimizer step. link: RAC-LoRA's federated "
        "form (docs/link-sync.md): each group of workers trains a whole link on its own data with no "
        "communication, and one all-reduce averages the trained factors at the boundary (ddp, or fsdp2 sharded "
        "within each group).")
    link_outer_lr: float = Field(
        1.0, gt=0, description="sync: link only: the averaged factor is scaled by this before it is merged (1: the "
        "paper's plain average; >1 makes up for the noise the average cancels, docs/link-sync.md).")
    link_sync_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="sync: link only: the dtype the factors travel in at the boundary's all-reduce "
        "(bfloat16: half the bytes; summed and divided in bf16, merged in fp32).")
    link_sync_rounds: int = Field(
        1, ge=1, description="sync: link only: sync rounds per link (DiLoCo's outer loop): every steps_per_link / "
        "rounds steps the groups average their factors and take an outer step (link_outer_lr), the last round "
        "being the boundary. 1: only the boundary (docs/link-sync.md).")
    sync_groups: int | None = Field(
        None, ge=1, description="sync: link only: how many groups average per link (contiguous ranks, e.g. one "
        "per node); inside a group, gradients are averaged every step (ddp), or the model is sharded over the "
        "group's ranks (fsdp2). Default: every worker is a group.")

    @model_validator(mode="after")
    def _single_runs_one_worker(self) -> DistributedSection:
        if self.strategy == "single" and self.workers > 1:
            raise ValueError("strategy 'single' runs one worker; use ddp, fsdp2 or deepspeed for workers > 1")
        return self

    @model_validator(mode="after")
    def _cpu_offload_is_fsdp2s(self) -> DistributedSection:
        if self.cpu_offload and self.strategy != "fsdp2":
            hint = ("set zero_optimization.offload_optimizer / offload_param in distributed.deepspeed"
                    if self.strategy == "deepspeed" else "it applies to the fsdp2 strategy")
            raise ValueError(f"cpu_offload: not available with strategy {self.strategy!r}; {hint}")
        return self

    def fsdp_unit_on(self, device_type: str, block_bytes: int) -> str:
        """``fsdp_unit`` with ``auto`` resolved for workers on ``device_type`` ("cpu", "cuda")
        and decoder blocks of ``block_bytes`` (weights as stored, unsharded).

        On CPU workers the gathered weights live in the same memory as the shards, and a
        unit's gather output and its unsharded parameters coexist during the copy-out: a
        block's sublayers in turn (attention, MLP) cut that peak by a third of a block at no
        cost in tokens/s on a large model. Below :data:`AUTO_SUBLAYER_BYTES` a block is a toy
        whose collectives' fixed cost dominates, and GPUs keep FSDP2's usual per-block unit
        (measured: docs/benchmarks.md, "Large models").
        """
        if self.fsdp_unit != "auto":
            return self.fsdp_unit
        return "sublayer" if device_type == "cpu" and block_bytes >= AUTO_SUBLAYER_BYTES else "block"

    @model_validator(mode="after")
    def _fsdp_unit_is_fsdp2s(self) -> DistributedSection:
        if self.fsdp_unit in ("sublayer", "linear") and self.strategy != "fsdp2":
            raise ValueError(f"fsdp_unit: {self.fsdp_unit!r} applies to the fsdp2 strategy, not {self.strategy!r}")
        return self

    @model_validator(mode="after")
    def _link_sync_runs_on_ddp_or_fsdp2(self) -> DistributedSection:
        if self.sync == "link" and self.strategy not in ("ddp", "fsdp2", "single"):
            raise ValueError(f"sync: link needs strategy ddp or fsdp2 (or single), not {self.strategy!r}: each "
                             "group trains its own factors during a link, and DeepSpeed's engine keeps one set")
        if self.sync == "link" and self.replicas != 1:
            raise ValueError("replicas applies to sync: step (HSDP); with sync: link the groups are sync_groups")
        if self.link_outer_lr != 1.0 and self.sync != "link":
            raise ValueError("link_outer_lr applies to sync: link; set sync: link or leave link_outer_lr unset")
        if self.link_sync_rounds != 1 and self.sync != "link":
            raise ValueError("link_sync_rounds applies to sync: link; set sync: link or leave link_sync_rounds unset")
        if self.link_sync_dtype != "float32" and self.sync != "link":
            raise ValueError("link_sync_dtype applies to sync: link; set sync: link or leave link_sync_dtype unset")
        if self.sync_groups is not None:
            if self.sync != "link":
                raise ValueError("sync_groups applies to sync: link; set sync: link or leave sync_groups unset")
            if self.workers % self.sync_groups:
                raise ValueError(f"sync_groups ({self.sync_groups}) must divide workers ({self.workers}): "
                                 "every group has the same number of workers")
        return self

    @model_validator(mode="after")
    def _replicas_are_fsdp2s(self) -> DistributedSection:
        if self.replicas == 1:
            return self
        if self.strategy != "fsdp2":
            hint = (" (DeepSpeed's hpZ and MiCS are not supported: shard ZeRO-3 over every worker, or use fsdp2)"
                    if self.strategy == "deepspeed" else "")
            raise ValueError(f"replicas: {self.replicas} applies to strategy fsdp2, not {self.strategy!r}{hint}")
        if self.workers % self.replicas or self.workers == self.replicas:
            raise ValueError(f"replicas ({self.replicas}) must divide workers ({self.workers}) into groups of 2 "
                             "or more ranks: every replica group shards the model over the same number of ranks")
        return self

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage (2 or 3, validated) under ``strategy: deepspeed``, else None:
        the one place the stage is read from the DeepSpeed section."""
        if self.strategy != "deepspeed":
            return None
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    @model_validator(mode="after")
    def _zero_stage_2_or_3(self) -> DistributedSection:
        stage = self.zero_stage
        if stage is not None and stage not in (2, 3):
            raise ValueError(f"deepspeed.zero_optimization.stage must be 2 or 3, got {stage!r}")
        zero = self.deepspeed.get("zero_optimization", {})
        for key in ("zero_hpz_partition_size", "mics_shard_size"):
            if (zero.get(key) or 0) > (1 if key == "zero_hpz_partition_size" else 0):
                # Measured: each loaded part's own zero.Init re-creates hpZ's group (DeepSpeed asserts).
                raise ValueError(f"deepspeed.zero_optimization.{key}: DeepSpeed's hierarchical partitioning does not "
                                 "run with raclora's streamed ZeRO-3 loading; for sharding inside a node and "
                                 "replicating across nodes use strategy fsdp2 with distributed.replicas")
        managed = sorted(set(self.deepspeed) & DEEPSPEED_MANAGED_KEYS)
        if managed:
            raise ValueError(f"deepspeed.{managed[0]}: raclora manages DeepSpeed's checkpoints (saved in its own "
                             "folders, loaded as tensors only); remove this key")
        return self


#: DeepSpeed config sections that would change how its checkpoints are written or read
#: (other engines, universal checkpoints loaded with pickle): the product owns that path.
DEEPSPEED_MANAGED_KEYS = {"checkpoint", "datastates"}


class RaySection(_Section):
    enabled: bool = Field(False, description="Run the workers under Ray Train (TorchTrainer); distributed.workers of them.")
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://HOST:10001'); unset: start an embedded local Ray.")
    name: str | None = Field(None, description="Ray Train run name; default: the run folder's name. Same name + storage resumes.")
    storage_path: str | None = Field(
        None, description="Where Ray keeps checkpoints (a folder or a pyarrow URI such as s3://...); default <run.dir>/ray."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts Ray allows (-1: unlimited); each resumes from the latest checkpoint.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes: PACK fills a node first (fast intra-node "
        "collectives), SPREAD spreads them, STRICT_* insist.")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0}, description="Ray resources per worker.")
    min_workers: int | None = Field(
        None, ge=1, description="Elastic: Ray Train may run the group with as few as this many workers (distributed."
        "workers is the most). A lost node's workers are not waited for: the group restarts at once from the latest "
        "checkpoint on what is left, and grows back from the latest checkpoint when capacity returns (looked for every "
        "resize_check_s). The global batch stays the same; each change is a 'resize' record (docs/ray.md).")
    resize_check_s: float = Field(
        60.0, gt=0, description="Elastic (min_workers): how often Ray Train looks for returned capacity to grow the "
        "group (ScalingConfig.elastic_resize_monitor_interval_s).")
    dashboard: bool = Field(False, description="Embedded Ray only: start the dashboard (bound to 127.0.0.1).")


class RunConfig(_Section):
    """The whole run: one section per layer of the system."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    raclora: RacLoraConfig = Field(default_factory=RacLoraConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> RunConfig:
        if self.train.batch_size % self.distributed.workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of distributed.workers "
                f"({self.distributed.workers}): each worker takes an equal slice of every batch"
            )
        return self

    def group_size(self) -> int:
        """The workers that must come and go together under elastic sizes: one HSDP replica or
        one link-sync group of fsdp2/ddp (``sync_groups``), else 1."""
        d = self.distributed  # groups: HSDP's replicas, link-sync's groups, or one per worker
        return d.workers // (d.replicas if d.replicas > 1 else (d.sync == "link" and d.sync_groups) or d.workers)

    def elastic_sizes(self) -> list[int]:
        """The world sizes an elastic run may take (``ray.min_workers`` .. ``distributed.workers``,
        whole groups only); ``[workers]`` when not elastic."""
        low = self.ray.min_workers or self.distributed.workers
        return [n for n in range(low, self.distributed.workers + 1) if n % self.group_size() == 0]

    @model_validator(mode="after")
    def _elastic_sizes_keep_the_batch(self) -> RunConfig:
        low = self.ray.min_workers
        if low is None:
            return self
        d = self.distributed
        if not self.ray.enabled:
            raise ValueError("ray.min_workers: elastic sizes come from Ray Train; set ray.enabled: true")
        if low > d.workers:
            raise ValueError(f"ray.min_workers ({low}) must be at most distributed.workers ({d.workers}), the most")
        if d.strategy == "deepspeed":
            raise ValueError("ray.min_workers: DeepSpeed's checkpoints resume only with the same number of workers; "
                             "use ddp or fsdp2 for an elastic run")
        if d.sync == "link" and self.checkpoint.every_steps:
            raise ValueError("ray.min_workers with distributed.sync: link: a mid-link checkpoint (checkpoint."
                             "every_steps) resumes only with the same workers; leave every_steps unset")
        if low % self.group_size():
            raise ValueError(f"ray.min_workers ({low}) must be a whole number of groups of {self.group_size()} "
                             "workers (distributed.replicas / sync_groups): a node's group comes and goes whole")
        bad = [n for n in self.elastic_sizes() if self.train.batch_size % n]
        if bad:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must split evenly over every size an "
                             f"elastic run may take ({', '.join(map(str, self.elastic_sizes()))} workers; not {bad[0]})")
        return self

    @model_validator(mode="after")
    def _sync_rounds_split_a_link(self) -> RunConfig:
        rounds, k = self.distributed.link_sync_rounds, self.raclora.steps_per_link
        if rounds > 1 and k % rounds:
            raise ValueError(f"distributed.link_sync_rounds ({rounds}) must divide raclora.steps_per_link ({k})")
        if rounds > 1 and self.checkpoint.every_steps:
            raise ValueError("distributed.link_sync_rounds > 1 with checkpoint.every_steps: the outer step's anchor "
                             "is not checkpointed mid-link; leave every_steps unset")
        return self

    @model_validator(mode="after")
    def _link_sync_resets_the_optimizer(self) -> RunConfig:
        if self.distributed.sync == "link" and self.raclora.optimizer_state != "reset":
            raise ValueError("raclora.optimizer_state: keep with distributed.sync: link: each group's moments describe "
                             "its own factor, not the averaged one the next link starts from; use reset")
        return self

    @model_validator(mode="after")
    def _master_weights_need_a_rounding_base(self) -> RunConfig:
        rc, m = self.raclora, self.model
        if (rc.master_weights != "none" or rc.stochastic_rounding is True) and not m.quantization.enabled \
                and m.dtype == "float32":
            raise ValueError("raclora.master_weights and raclora.stochastic_rounding apply to bases that round a "
                             "merge: model.dtype bfloat16 or float16, or model.quantization (nf4, fp4); this base is "
                             "model.dtype float32, which merges exactly: leave them unset")
        if (rc.master_weights != "none" or rc.stochastic_rounding is True) and m.quantization.enabled \
                and rc.merge_mode == "auto":
            raise ValueError("raclora.master_weights and raclora.stochastic_rounding need raclora.merge_mode into_base "
                             "on a 4-bit base, whose merge_mode auto is factored")
        return self

    @model_validator(mode="after")
    def _cpu_offload_needs_gpu_workers(self) -> RunConfig:
        if self.distributed.cpu_offload and self.ray.enabled and not self.ray.use_gpu:
            raise ValueError(f"distributed.cpu_offload: {CPU_OFFLOAD_NEEDS_GPU} (ray.use_gpu is false)")
        return self

    @model_validator(mode="after")
    def _no_lossy_4bit_merge_unless_allowed(self) -> RunConfig:
        rc, q = self.raclora, self.model.quantization
        if (q.enabled and rc.merge_mode == "into_base" and rc.master_weights == "none" and rc.stochastic_rounding is not True
                and not rc.allow_lossy_merge):
            raise ValueError(
                "raclora.merge_mode=into_base on a 4-bit base requantizes each merged link in place, and most of a "
                "link's update rounds back to the old codes, and the loss compounds (measured in docs/benchmarks.md, "
                "merge fidelity). Use merge_mode auto or factored (exact), "
                "or into_base with master_weights: cpu or stochastic_rounding: true; or set "
                "raclora.allow_lossy_merge: true to accept the loss")
        return self

    @model_validator(mode="after")
    def _packed_codes_survive_bf16(self) -> RunConfig:
        q = self.model.quantization
        if q.enabled and self.distributed.mixed_precision == "bf16" and q.storage in ("float32", "float16"):
            raise ValueError(f"model.quantization.storage_dtype={q.storage_dtype!r} with distributed.mixed_precision=bf16: "
                             "the engine would cast the packed 4-bit codes to bf16 and corrupt them; use uint8 (auto) "
                             "or bfloat16")
        return self

    def to_yaml(self) -> str:
        """The config as a run folder saves it: every field, under the format's ``config_version``."""
        return yaml.safe_dump({"config_version": CONFIG_VERSION, **self.model_dump(mode="json")}, sort_keys=False)


CPU_OFFLOAD_NEEDS_GPU = ("it moves FSDP2 shards between GPU and CPU memory, and CPU workers hold them in CPU "
                         "memory already; set it false")

def build_config(data: dict[str, Any], source: str = "config", *, saved: bool = False) -> RunConfig:
    """Validates a config mapping; all problems are reported together, each naming its field.

    Args:
        saved: the mapping is a run folder's saved config: without a ``config_version`` it was
            written before versions and reads as that release ran it (``config_version``).
    """
    try:
        version = read_version(data, source)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data = {k: v for k, v in data.items() if k != "config_version"}
    if saved and version is None:
        data = as_saved_before_versions(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads, merges overrides into, and validates a config; sets ``run.dir`` if unset. A run
    folder's own ``config.yaml`` (one beside its ``checkpoints``) reads as saved (``build_config``)."""
    data = deep_merge(expand_shorthands(read_yaml(path)), parse_overrides(overrides or []))
    run = data.get("run")
    if not isinstance(run, dict) or run.get("dir") is None:
        data = deep_merge(data, {"run": {"dir": str(Path("runs") / Path(path).stem)}})
    saved = Path(path).name == "config.yaml" and (Path(path).parent / "checkpoints").is_dir()
    return build_config(data, str(path), saved=saved)


def with_values(cfg: RunConfig, changes: dict[str, Any], source: str = "config") -> RunConfig:
    """A copy of ``cfg`` with dotted fields changed, validated again as a whole.

    Configs are frozen; this is the one way to change one, so that no combination of
    changes yields a config that would fail where it is next read (a worker, a cluster).

    Args:
        changes: ``{"distributed.workers": 3, "ray.enabled": True, ...}``; a value that is a
            mapping replaces the field whole.
        source: what made the change, for the error (e.g. ``raclora k8s render``).

    Raises:
        ConfigError: the changed config is invalid; names each field and its value.
    """
    data = cfg.model_dump(mode="json")
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return build_config(data, source)


def _describe(e: Any) -> str:
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        parent = _section_model(e["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{loc}: unknown field; allowed fields here: {allowed}"
    if e["type"] == "missing":
        return f"{loc}: required field is missing"
    return f"{loc}: {e['msg']} (got {e.get('input')!r})" if loc else e["msg"]


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model
