"""The backend surface the trainer uses, and the single-process backend it defaults to.

A backend owns: how the model is wrapped or sharded, the optimizer, backward and step,
where the trainable factors and base weights live (its :class:`FactorAccess`), the
collectives (its :class:`Comm`), and how optimizer state is saved and loaded. Siblings
override what differs; the engines are imported inside the subclasses that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raclora_dist.backends.dist import DistInfo, barrier, whole
from raclora_dist.backends.tensor_files import load_tensors
from raclora_dist.config import RunConfig
from raclora_dist.core import Comm, DenseAccess, FactorAccess, LocalComm, RacLoraLinear


def lm_inputs(device: torch.device, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, num_items: float | None = None) -> dict:
    """Keyword arguments of a causal-LM forward for one micro-batch, on ``device``.

    Args:
        input_ids: (B, T) token ids. labels: (B, T), -100 where no loss is taken; None: the
            ids themselves (loss on every token).
        position_ids: (B, T), restarting at 0 at each packed example, so that transformers
            builds a block-diagonal causal mask (no attention across examples); None: 0..T-1.
        num_items: the loss is the sum over labelled tokens divided by this (the global
            micro-batch's labelled tokens / world size, so that the ranks' averaged gradient is
            the one-process gradient); None: the mean over this rank's labelled tokens.
    """
    ids = input_ids.to(device)
    if labels is None:
        return {"input_ids": ids, "labels": ids}
    out = {"input_ids": ids, "labels": labels.to(device), "use_cache": False}
    if position_ids is not None:
        out["position_ids"] = position_ids.to(device)
    if num_items is not None:
        out["num_items_in_batch"] = torch.tensor(float(num_items), device=device)
    return out


def _whole_block(device_type: str, block_bytes: int) -> str:
    return "block"


@dataclass(frozen=True)
class Layout:
    """Where an engine keeps the run's tensors on each rank: what the loader and the memory
    estimate (``raclora validate``) ask of it, declared by the engine for a config and a
    worker count (:meth:`Backend.plan`), so that neither re-derives it.

    Attributes:
        weight_ranks: the ranks the base weights are sharded over (1: a full replica per rank).
            Above 1, each decoder block is gathered whole (or a unit of it) for its compute.
        state_ranks: the ranks the factors' gradients and optimizer state are sharded over.
        splits_vocab: a frozen untied embedding and head are split by vocabulary rows across
            the ``weight_ranks`` (:mod:`raclora_dist.backends.vocab_parallel`) instead of sharded.
        gather_unit: ``(device_type, block_bytes) -> "block" | "sublayer" | "linear"``: what
            one gather brings in of a decoder block of ``block_bytes`` on workers of that device.
        weights_offloaded: the weight shards live in CPU memory.
        state_offloaded: the gradients and optimizer state live in CPU memory.
    """

    weight_ranks: int = 1
    state_ranks: int = 1
    splits_vocab: bool = False
    gather_unit: Callable[[str, int], str] = field(default=_whole_block)
    weights_offloaded: bool = False
    state_offloaded: bool = False


class Backend:
    """One process, no engine: the reference every distributed backend must match.

    Args:
        cfg: the run config. info: this process's rank, world size and device.
    """

    name = "single"

    def __init__(self, cfg: RunConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.comm: Comm = LocalComm()
        self.step_comm: Comm | None = None  # per-step statistics; None: ``comm`` (all ranks)
        # The ranks whose gradients are averaged at each step: all of them, or under link-sync
        # (distributed.sync: link) a group of contiguous ranks that trains its own link.
        self.sync_group_size = info.world_size
        self.access: FactorAccess = DenseAccess()
        self.layout = self.plan(cfg, info.world_size)
        # Set by setup(): the wrapped model and the optimizer over its trainable factors.
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer

    @classmethod
    def plan(cls, cfg: RunConfig, world: int) -> Layout:
        """Where this engine keeps the tensors of ``cfg`` run on ``world`` workers (imports no
        engine: the memory estimate asks it before anything starts)."""
        return Layout()

    # -- setup ------------------------------------------------------------------------
    @property
    def splits_vocab(self) -> bool:
        """Whether the loader should split a frozen untied embedding and head by vocabulary
        rows (:mod:`raclora_dist.backends.vocab_parallel`) instead of handing them to
        :meth:`shard_unit`: sharding engines with several ranks, unless the config says no."""
        return self.layout.splits_vocab

    def vocab_split(self) -> tuple[int, int, torch.distributed.ProcessGroup | None]:
        """``(rank, world, group)`` of a vocabulary split (:attr:`splits_vocab`): this rank's
        place among the ranks that split the rows, their number, and their process group
        (None: every rank)."""
        return self.info.rank, self.info.world_size, None

    @property
    def gathers_blocks(self) -> bool:
        """Whether each decoder block's weights are sharded and gathered whole for its compute
        (FSDP2 and ZeRO-3 with several ranks); replicated engines keep them in place."""
        return self.layout.weight_ranks > 1

    def shard_unit(self, module: nn.Module, own_unit: bool) -> None:
        """Called on each part of the model as soon as it is loaded (bottom-up, before
        :meth:`setup`), so that sharding engines partition it before the next part arrives
        and no rank ever holds more than its shards plus one part. Replicated engines
        (single, DDP, ZeRO-2) keep every part whole.

        Args:
            module: the loaded part (a decoder block, an embedding, a head, ...), real on
                ``info.device``.
            own_unit: the loader's advice that the part is big enough to be sharded as a
                unit of its own (FSDP2 ``fully_shard``); small parts may go with the root.
        """

    def setup(self, model: nn.Module) -> None:
        """Wraps/shards ``model`` and builds the optimizer over its trainable factors.

        ``model`` is loaded (its parts already passed through :meth:`shard_unit`)."""
        self.model = model.to(self.info.device)
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    # -- the step -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, num_items: float | None = None) -> torch.Tensor:
        """Causal-LM loss of one micro-batch (B, T) on this rank (see :func:`lm_inputs`)."""
        return self.model(**lm_inputs(self.info.device, input_ids, labels, position_ids, num_items)).loss

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's forward and backward; ``last``: the one before the
        optimizer step (engines that can skip gradient communication on the others do)."""
        return contextlib.nullcontext()

    def loss_scale_items(self, labelled: list[int]) -> float:
        """``num_items`` for this rank's loss (:func:`lm_inputs`), given the labelled tokens of
        every rank's slice of a global micro-batch (rank order): the count over the ranks
        whose gradients are averaged (all; under link-sync this rank's group, which trains on
        its own) / their number, so that their averaged gradient is the one-process gradient
        of their tokens."""
        size = self.sync_group_size
        g = self.info.rank // size
        return max(sum(labelled[g * size : (g + 1) * size]), 1) / size

    def link_average(self) -> bool | Comm:
        """What the chain averages the factors over at a boundary
        (:meth:`~raclora_dist.core.chain.RacLoraChain.end_link`'s ``average``): False (sync:
        step: the factors are equal everywhere), True (every rank), or a :class:`Comm` over
        the ranks that hold the same part of the factors in the other groups."""
        return self.cfg.distributed.sync == "link"

    def step(self, clip: float | None) -> float:
        """Clips (global norm), steps, zeroes grads; returns the pre-clip grad norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(whole(norm))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self) -> None:
        """Forgets the optimizer state of the factors (their old sketch's coordinates)."""
        self.optimizer.state.clear()

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a global micro-batch (B, T) -> (B / world, T)."""
        return batch.chunk(self.info.world_size)[self.info.rank]

    # -- state --------------------------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        """Writes the optimizer state into a checkpoint folder (called on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not self.optimizer.state:
            # Just reset at the boundary. get_optimizer_state_dict would initialise the empty
            # state with a zero-gradient step (Adam's step counter -> 1), silently turning the
            # next link's first step into a second one.
            if self.info.is_main:
                torch.save({"state": {}}, folder / "optimizer.pt")
            return
        # A full (unsharded) state dict keyed by parameter name: the factors are small, and
        # the file then loads at any world size.
        state = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            torch.save(state, folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = load_tensors(folder / "optimizer.pt")
        if not state.get("state"):
            return  # a reset at the boundary: the fresh optimizer is already right
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        barrier()


def shard_masters(model: nn.Module, rank: int, world: int) -> None:
    """Keeps each 4-bit layer's master copy (if any) as this rank's slice only."""
    for module in model.modules():
        if isinstance(module, RacLoraLinear):
            module.shard_master(rank, world)


def decoder_layers(model: nn.Module, required: bool = True) -> list[nn.Module]:
    """The repeated transformer blocks (HF ``_no_split_modules`` classes), in order.

    Args:
        required: raise when there are none; False: return [] (the callers that then treat
            every module with tensors as a part of its own, or take the engine's defaults).

    Raises:
        ValueError: ``required`` and the model declares no such blocks.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    # By any class in the MRO: FSDP2 swaps a sharded block's class for an FSDP<Block> subclass.
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks and required:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__} to shard")
    return blocks
