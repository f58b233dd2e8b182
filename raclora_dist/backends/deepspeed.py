"""DeepSpeed ZeRO-2/3. The user's DeepSpeed dict is passed through; batch sizes, clipping and
precision are filled from the run config where the dict leaves them unset.

ZeRO keeps each trainable factor twice: the working copy the forward uses (replicated in
ZeRO-2, partitioned in ZeRO-3) and an fp32 master partition in the optimizer. Reading a
factor goes through ``safe_get_full_fp32_param``; zeroing it sets both copies. Under ZeRO-3
the frozen base weight is partitioned too: the merge gathers it with ``GatheredParameters``
and rank 0's in-place edit is re-partitioned on exit (the same math as a dense merge, so a
replay on resume reproduces it).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raclora_dist.backends.base import Backend, Layout, decoder_layers, lm_inputs, shard_masters
from raclora_dist.backends.dist import DistComm, gather_by_broadcasts
from raclora_dist.backends.tensor_files import DEEPSPEED_DATA_CLASSES, load_tensors
from raclora_dist.config import ConfigError
from raclora_dist.core import RacLoraLinear
from raclora_dist.core.layer import MergeView

TAG = "state"


class DeepSpeedAccess:
    def __init__(self, rank: int, stage: int, comm: DistComm) -> None:
        self.rank, self.stage, self.comm = rank, stage, comm

    def local_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        raise NotImplementedError("distributed.sync: link does not run under deepspeed (refused by the config)")

    def full_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(layer.factor)  # collective under ZeRO-3

    def local_finite(self, layer: RacLoraLinear) -> bool:
        return bool(torch.isfinite(self.full_factor(layer)).all())

    @contextlib.contextmanager
    def merge_view(self, layer: RacLoraLinear) -> Iterator[MergeView]:
        if self.stage != 3:  # ZeRO-2: the weights (and chain) are replicated; merge the copy
            yield layer.local_view()
            return
        import deepspeed

        params = [layer.chain_B, layer.chain_A] if layer.merge_target == "chain" else [layer.base_layer.weight]
        # Every rank computes the same merge on the gathered tensors (4-bit layers must all
        # set their new quant state); rank 0's result is what is re-partitioned on exit.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield MergeView(weight=layer.base_weight.data, chain_B=layer.chain_B.data,
                            chain_A=layer.chain_A.data, gather=self.comm.all_gather_flat, owner=self.rank == 0)

    @torch.no_grad()
    def zero_factor(self, layer: RacLoraLinear) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        p = layer.factor
        safe_set_full_fp32_param(p, torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape,
                                                dtype=torch.float32, device=p.device))
        if self.stage == 3:
            import deepspeed

            # Through GatheredParameters rather than the local partition: ZeRO-3 keeps small
            # parameters (below stage3_param_persistence_threshold) as full copies on every
            # rank, and a forward before the next step would still see the old factor.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.zero_()
        else:
            p.data.zero_()


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg, info) -> None:
        import deepspeed  # noqa: F401 -- here, before the model loads: shard_unit needs it from the first part on

        super().__init__(cfg, info)
        self.comm = DistComm(info.device)
        self.ds_config = self._ds_config()
        self.stage = cfg.distributed.zero_stage
        self.access = DeepSpeedAccess(info.rank, self.stage, self.comm)

    def _ds_config(self) -> dict:
        t = self.cfg.train
        ds = copy.deepcopy(self.cfg.distributed.deepspeed)
        ds.setdefault("train_micro_batch_size_per_gpu", t.batch_size // self.info.world_size)
        ds.setdefault("gradient_accumulation_steps", t.grad_accum)
        ds.setdefault("gradient_clipping", t.grad_clip or 0.0)
        # Our torch optimizer (AdamW/SGD) avoids compiling DeepSpeed's fused Adam ops.
        ds.setdefault("zero_allow_untested_optimizer", True)
        if offloads(ds, "offload_optimizer") and t.optimizer != "adamw":
            # ZeRO-Offload refuses a client optimizer unless told it is meant; SGD has no
            # DeepSpeed CPU counterpart and torch's steps the host partitions as well.
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
        ds.setdefault("steps_per_print", 10**9)
        if self.cfg.distributed.mixed_precision == "bf16":
            ds.setdefault("bf16", {"enabled": True})
        return ds

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        t = self.cfg.train
        if not (offloads(self.ds_config, "offload_optimizer") and t.optimizer == "adamw"):
            return super()._make_optimizer(params)
        # ZeRO-Offload steps the fp32 master partitions in host memory, where DeepSpeed's
        # vectorised CPU Adam is the optimizer it expects (a C++ op, built once per machine,
        # about a minute, then cached). adamw_mode: the decoupled weight decay of torch's AdamW.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, adamw_mode=True)

    @classmethod
    def plan(cls, cfg, world: int) -> Layout:
        """ZeRO-2 and 3 shard the gradients and optimizer state over every rank; ZeRO-3 the
        weights too (each part's ``zero.Init``), gathered a block at a time."""
        d = cfg.distributed
        weights = world if d.zero_stage == 3 else 1
        return Layout(weight_ranks=weights, state_ranks=world, splits_vocab=weights > 1 and d.vocab_parallel,
                      weights_offloaded=offloads(d.deepspeed, "offload_param"),
                      state_offloaded=offloads(d.deepspeed, "offload_optimizer"))

    def shard_unit(self, module: nn.Module, own_unit: bool) -> None:
        """ZeRO-3 partitions every loaded part at once (``zero.Init(module=...)`` partitions
        a built module "as if it was constructed in the context"), so the whole model never
        exists on one rank; ZeRO-2 replicates the frozen base and keeps it whole."""
        if self.stage != 3 or not any(True for _ in module.parameters()):
            return
        import deepspeed

        skip_inference_shm_op()
        quiet_deprecated_collectives()
        deepspeed.init_distributed(dist_backend=self.comm_backend(), dist_init_required=False)
        gather_in_place_on_gloo()
        shard_masters(module, self.info.rank, self.info.world_size)
        deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config)

    def comm_backend(self) -> str:
        import torch.distributed as dist

        return dist.get_backend() if dist.is_initialized() else ("nccl" if self.info.device.type == "cuda" else "gloo")

    def setup(self, model: nn.Module) -> None:
        import deepspeed

        if self.stage == 3:  # parts that did not pass through shard_unit (e.g. tests building whole)
            shard_masters(model, self.info.rank, self.info.world_size)
            blocks = decoder_layers(model, required=False)  # none: DeepSpeed's defaults
            fill_stage3_limits(self.ds_config, max((_numel(b) for b in blocks), default=0),
                               on_cpu=self.info.device.type == "cpu")
        else:
            model = model.to(self.info.device)
        params = [p for p in model.parameters() if p.requires_grad]
        skip_inference_shm_op()
        quiet_deprecated_collectives()
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self._make_optimizer(params), config=self.ds_config,
            dist_init_required=False,
        )
        gather_in_place_on_gloo()
        engine.checkpoint_engine = tensors_only_checkpoint_engine(engine.checkpoint_engine)
        self.model, self.optimizer, self.engine = engine, optimizer, engine

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, num_items: float | None = None) -> torch.Tensor:
        return self.engine(**lm_inputs(self.engine.device, input_ids, labels, position_ids, num_items)).loss

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a non-boundary step only advances DeepSpeed's micro-step count

    def step(self, clip: float | None) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self) -> None:
        # ZeRO wraps our torch optimizer; its state is keyed by the flat fp32 partitions.
        self.engine.optimizer.optimizer.state.clear()

    def save_state(self, folder: Path) -> None:
        # DeepSpeed's own (per-rank partitioned) checkpoint; the frozen base is not stored.
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag=TAG, exclude_frozen_parameters=True,
                                    save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag=TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed state with tag {TAG!r}")


def tensors_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine with its loads made data-only.

    DeepSpeed 0.19 loads its model and ZeRO state files with torch.load and its full unpickler (weights-only off):
    a file planted in the checkpoint's storage would run code on every worker at resume. This
    engine saves as DeepSpeed's does and loads through :func:`load_tensors` (tensors, plain
    containers and the few data classes ZeRO's state holds); anything else is refused with the
    file named. Raises ConfigError if DeepSpeed was configured with another engine (its
    ``checkpoint`` section is refused by the config, so this is a guard).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine) is not TorchCheckpointEngine:
        raise ConfigError(f"DeepSpeed chose the {type(engine).__name__}; raclora loads DeepSpeed checkpoints "
                          "only through its tensors-only torch engine")

    class TensorsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors(path, map_location=map_location, allow=DEEPSPEED_DATA_CLASSES)

    safe = TensorsOnly.__new__(TensorsOnly)
    safe.__dict__.update(engine.__dict__)  # same serialization settings, no second init log
    return safe


IN_PLACE_GATHER_BYTES = 1 << 20
"""DeepSpeed gathers this large and larger go by broadcasts on gloo; below it the staging copy is
small, and gloo's one collective beats a broadcast per rank (the tests' tiny model, whose
ZeRO-3 gathers are all small: a run took 70 s with every gather broadcast, 42 s without)."""


def skip_inference_shm_op() -> None:
    """Stops DeepSpeed's comm backend from building its shared-memory all-reduce op; call before
    DeepSpeed's comm is set up (``init_distributed``, ``initialize``).

    On CPU workers DeepSpeed compiles that C++ op (about 30 s on 2 cores, and a compiler on the
    worker) the first time a machine sets its comm up, and opens shared-memory files each run,
    for ``inference_all_reduce`` alone: tensor-parallel inference, which training never calls.
    Without it every collective is torch.distributed's, as before. Idempotent.
    """
    import importlib

    # by module name: the package's attribute ``deepspeed.comm.torch`` is torch itself
    comm_torch: Any = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    return None


def quiet_deprecated_collectives() -> None:
    """Ignores torch's FutureWarning on the two collectives DeepSpeed's comm calls by their
    names deprecated in torch 2.13 (a user can do nothing about them; with offload they repeat
    every few steps, as something resets the warnings' once-per-place registry)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)


def gather_in_place_on_gloo() -> bool:
    """On gloo (CPU workers), makes DeepSpeed's all-gathers of :data:`IN_PLACE_GATHER_BYTES` and
    more one in-place broadcast per rank (:func:`~raclora_dist.backends.dist.gather_by_broadcasts`),
    in place on its comm backend.

    ZeRO-3 gathers each weight for its compute through ``all_gather_into_tensor``, which gloo
    stages in a second buffer as large as the weight: a rank held the largest weight it gathers
    twice, the last block's beside every activation of the forward (measured:
    docs/benchmarks.md, "Large models"). The same bytes arrive; NCCL gathers in place already.
    Idempotent.

    Returns:
        Whether DeepSpeed's gathers go this way (False: not gloo, or DeepSpeed's comm is not set up).
    """
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    cdb = ds_comm.cdb
    if cdb is None or not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    if not getattr(cdb, "raclora_gathers_by_broadcasts", False):
        gloos = cdb.all_gather_into_tensor

        def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
            if output_tensor.nbytes < IN_PLACE_GATHER_BYTES:
                return gloos(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
            return gather_by_broadcasts(output_tensor, input_tensor, group, async_op=async_op)

        cdb.all_gather_into_tensor = all_gather_into_tensor
        cdb.raclora_gathers_by_broadcasts = True
    return True


def offloads(ds_config: dict, what: str) -> bool:
    """Whether a DeepSpeed dict moves ``what`` (``offload_optimizer``: optimizer state and
    gradients; ``offload_param``: parameters) off the accelerator."""
    offload = ds_config.get("zero_optimization", {}).get(what) or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def fill_stage3_limits(ds_config: dict, block_params: int, on_cpu: bool = False) -> None:
    """Sets ZeRO-3's limits on gathered parameters from the model where the dict leaves them
    unset (in place): one decoder block live, reused and prefetched, or DeepSpeed's default
    where that is smaller (a large model's blocks exceed its 5e7 prefetch bucket). On CPUs
    nothing is prefetched or kept for reuse: one block is gathered at a time.

    DeepSpeed's defaults (1e9 live parameters, reuse distance 1e9, a 5e7 prefetch bucket)
    suit models far larger than 1e9 parameters; below that, from the second step on (once
    it has traced the model) ZeRO-3 keeps nearly every parameter gathered: a rank then holds
    more than the whole checkpoint, and runs slower than with one block live (measured:
    docs/benchmarks.md, "Large models"). On CPUs a prefetched or kept block is one more
    block held beside the one computing: 0.77x the checkpoint per rank from the second step
    with them, 0.70x without, for 3-10 % fewer tokens/s (0.79 B, 2 workers; GPUs overlap the
    prefetch with compute and keep one block).

    Args:
        block_params: elements of the largest decoder block (0: no blocks, nothing set).
        on_cpu: the ranks compute on CPUs.
    """
    if block_params <= 0:
        return
    zero = ds_config.setdefault("zero_optimization", {})
    for key, default in _STAGE3_DEFAULTS.items():
        keeps = on_cpu and key != "stage3_max_live_parameters"
        zero.setdefault(key, 0 if keeps else min(block_params, default))


_STAGE3_DEFAULTS = {  # DeepSpeed's own (runtime/zero/config.py)
    "stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9, "stage3_prefetch_bucket_size": 5 * 10**7,
}


def _numel(module: nn.Module) -> int:
    """Elements of a module's parameters, whole (a ZeRO-3 partition counts its full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
