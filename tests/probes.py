"""Callbacks that let a test look inside a run (``raclora_dist.train.callbacks``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from raclora_dist.observe.metrics import current_rss_mb
from raclora_dist.train.callbacks import Callback


class DumpShards(Callback):
    """When training starts, each rank writes what it holds of every parameter to
    ``out/rank<R>.safetensors``, and ``out/rank<R>.json`` says where each piece sits:

    * ``{"kind": "rows", "offset": o}``: rows ``o ..`` of the full tensor (an FSDP2 shard);
    * ``{"kind": "flat", "offset": o}``: elements ``o ..`` of the flattened tensor (a ZeRO-3
      partition, padding dropped);
    * ``{"kind": "full"}``: the whole tensor (replicated).

    The rows of an embedding or head split by vocabulary (buffers of
    :mod:`raclora_dist.backends.vocab_parallel`) count as parameters here, padding dropped.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    @torch.no_grad()
    def on_train_start(self, trainer) -> None:
        rank, world = trainer.backend.info.rank, trainer.backend.info.world_size
        if hasattr(trainer.s.model, "reshard"):  # FSDP2 keeps the root unsharded after a forward
            trainer.s.model.reshard()
        tensors, where = {}, {}
        for name, p in trainer.s.model.named_parameters():
            if hasattr(p, "to_local"):  # FSDP2 DTensor, Shard(0) in torch.chunk's ceil-sized row chunks
                local = p.to_local()
                rows = p.shape[0]
                tensors[name], where[name] = local, {"kind": "rows", "offset": min(rows, rank * -(-rows // world))}
            elif hasattr(p, "ds_tensor"):  # ZeRO-3 partition: equal flat chunks, the last one padded
                part = p.ds_tensor.numel()
                offset = rank * part
                valid = max(0, min(part, p.ds_numel - offset))
                tensors[name], where[name] = p.ds_tensor.flatten()[:valid], {"kind": "flat", "offset": offset}
            else:
                tensors[name], where[name] = p.data, {"kind": "full"}
        for name, m in trainer.s.model.named_modules():  # an embedding or head split by vocabulary rows
            if hasattr(m, "per_rank") and hasattr(m, "start"):
                key = f"{name}.weight"
                tensors[key], where[key] = m.weight[: m.stop - m.start], {"kind": "rows", "offset": m.start}
        self.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self.out / f"rank{rank}.safetensors")
        (self.out / f"rank{rank}.json").write_text(json.dumps(where))


class DumpFactors(Callback):
    """Before each boundary, each rank writes its trained factors (before any averaging) to
    ``out/rank<R>-link<L>.safetensors``, keyed by module name."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    @torch.no_grad()
    def before_boundary(self, trainer, link: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # Whole factors: a sharding engine's are gathered (a collective over the group's ranks).
        factors = {n: trainer.s.chain.access.full_factor(layer).cpu().clone() for n, layer in trainer.s.layers.items()}
        save_file(factors, self.out / f"rank{trainer.backend.info.rank}-link{link}.safetensors")


class CountUnits(Callback):
    """When training starts, rank 0 writes to ``out`` how many FSDP2 units the model has."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer) -> None:
        from torch.distributed.fsdp import FSDPModule

        if trainer.backend.info.is_main:
            self.out.write_text(str(sum(isinstance(m, FSDPModule) for m in trainer.s.model.modules())))


class CountHeapReleases(Callback):
    """Counts the heap trims (``model.heap.release_freed``) of the first optimizer step; rank 0
    writes the count to ``out``."""

    def __init__(self, out: str) -> None:
        self.out, self.count = Path(out), None

    def on_train_start(self, trainer) -> None:
        from raclora_dist.model import heap

        real, self.count = heap.release_freed, 0

        def counted() -> bool:
            self.count += 1
            return real()

        heap.release_freed = counted  # the hooks look it up at each call

    def on_step_end(self, trainer, record: dict) -> None:
        if trainer.backend.info.is_main and not self.out.exists():
            self.out.write_text(str(self.count))


class DescribeOptimizer(Callback):
    """After each link, rank 0 writes to ``out`` (JSON) the class of the optimizer a DeepSpeed
    engine steps, whether the engine offloads optimizer state and parameters, ZeRO-3's
    limit on live gathered parameters, whether its gathers go by broadcasts, and whether its comm
    built the shared-memory op of inference's all-reduce."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_boundary(self, trainer, record: dict) -> None:
        import deepspeed.comm.comm

        engine = trainer.backend.engine
        if trainer.backend.info.is_main:
            self.out.write_text(json.dumps({
                "optimizer": type(engine.optimizer.optimizer).__name__,
                "offload_optimizer": bool(engine.zero_offload_optimizer()),
                "offload_param": bool(engine.zero_offload_param()),
                "max_live_parameters": engine.zero_max_live_parameters(),
                # ZeRO-3 gathers by in-place broadcasts on gloo (backends/deepspeed.py)
                "gathers_by_broadcasts": bool(getattr(deepspeed.comm.comm.cdb, "raclora_gathers_by_broadcasts", False)),
                "shm_op": deepspeed.comm.comm.cdb.shm_comm_op is not None,
            }))


class ChainSize(Callback):
    """At each boundary (after the merge, before the checkpoint), rank 0 appends to ``out``
    (JSON lines): the merged chain's elements held, each layer's filled chain rank, and the
    links whose factors the record holds in RAM."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_boundary(self, trainer, record: dict) -> None:
        if not trainer.backend.info.is_main:
            return
        layers = trainer.s.layers.values()
        row = {"link": record["link"],
               "chain_elements": sum(layer.chain_B.numel() + layer.chain_A.numel() for layer in layers),
               "chain_ranks": [layer.chain_rank for layer in layers],
               "in_ram": trainer.s.chain.state.factors.in_ram,
               "rss_mb": current_rss_mb()}
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")


class CountEvalRows(Callback):
    """Counts the rows each rank runs through the model while evaluating at link boundaries:
    ``out/rank<R>.json`` holds ``{"rows": n, "evals": k}`` so far, rewritten at each boundary."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer) -> None:
        backend, evaluate = trainer.backend, trainer.evaluate
        forward = backend.forward
        self.rows = self.evals = 0
        inside = [False]

        def counting_forward(input_ids, *args, **kwargs):
            if inside[0]:
                self.rows += len(input_ids)
            return forward(input_ids, *args, **kwargs)

        def counting_evaluate():
            inside[0] = True
            try:
                return evaluate()
            finally:
                inside[0] = False
                self.evals += 1

        backend.forward, trainer.evaluate = counting_forward, counting_evaluate
        self.rank = backend.info.rank

    def on_boundary(self, trainer, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps({"rows": self.rows, "evals": self.evals}))


class MeshProbe(Callback):
    """When training starts, rank 0 writes to ``out`` (JSON) the device mesh and placements of
    the first trainable factor: how FSDP2 really sharded it (``[]`` when it is not a DTensor)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer) -> None:
        import json

        p = next(p for p in trainer.s.model.parameters() if p.requires_grad)
        mesh = getattr(p, "device_mesh", None)
        info = {"mesh": list(mesh.shape) if mesh is not None else [],
                "placements": [type(x).__name__ for x in getattr(p, "placements", ())]}
        if trainer.backend.info.is_main:
            self.out.write_text(json.dumps(info))


class RecordLog(Callback):
    """Rank 0 appends what its hooks were handed to ``out`` (JSON lines): every metrics line
    (``{"hook": "on_record", "record": ...}``) and every checkpoint's record
    (``{"hook": "on_checkpoint", "folder": name, "record": ...}``)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _log(self, trainer, entry: dict) -> None:
        if trainer.is_main:
            with self.out.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def on_record(self, trainer, record: dict) -> None:
        self._log(trainer, {"hook": "on_record", "record": record})

    def on_checkpoint(self, trainer, folder: Path, record: dict) -> None:
        self._log(trainer, {"hook": "on_checkpoint", "folder": folder.name, "record": record})


class Environment(Callback):
    """When training starts, rank 0 writes the environment variables ``names`` of its process
    (absent: null) to ``out`` as JSON: what a launcher passed down to the workers."""

    def __init__(self, out: str, names: list[str]) -> None:
        self.out, self.names = Path(out), names

    def on_train_start(self, trainer) -> None:
        import os

        if trainer.backend.info.rank == 0:
            self.out.write_text(json.dumps({name: os.environ.get(name) for name in self.names}))
