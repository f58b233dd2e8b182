"""A frozen input embedding and output head split by vocabulary rows across data-parallel ranks.

Under FSDP2 and ZeRO-3 the untied embedding and head of a large-vocabulary model are the
biggest units (32,000 x 4,096 fp32 is 500 MiB each), and sharding them by the engine means
gathering each whole for every forward and backward: a rank briefly holds the full matrix
twice (the gather and its copy-out; with gloo a third, temporary copy). Both are frozen in
RAC-LoRA, so nothing needs them whole: here each rank keeps its ``ceil(V / world)`` rows for
good, and the *activations* travel instead -- the hidden states of every rank's tokens (a few
MiB) are gathered, each rank computes its vocabulary slice of everyone's logits, and an
all-to-all hands each rank the full logits of its own tokens. The backward sends the logits'
gradient the same way back and sums the hidden states' gradient over ranks.

The results are those of the plain modules up to float rounding (the head's dot products are
the same, blocked differently), for any model whose embedding is ``nn.Embedding`` and whose
head is a bias-free ``nn.Linear``. Every rank must call them together with inputs of the same
shape (the training loop's micro-batches and eval batches are).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raclora_dist.backends.dist import TRAFFIC

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def vocab_rows(vocab: int, rank: int, world: int) -> tuple[int, int, int]:
    """``(start, stop, per_rank)``: this rank's rows of a ``vocab``-row matrix (the last rank's
    slice may be short or empty; every rank stores ``per_rank`` rows, zero-padded)."""
    per = -(-vocab // world)
    start = min(rank * per, vocab)
    return start, min(start + per, vocab), per


def _slice(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of ``full`` (V, H), zero-padded to ``per_rank`` rows (a copy)."""
    start, stop, per = vocab_rows(full.shape[0], rank, world)
    out = full.new_zeros(per, full.shape[1])
    out[: stop - start] = full[start:stop]
    return out


def _all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(N, ...) on each rank of ``group`` -> (world * N, ...), rank-major."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    TRAFFIC.add(x, group)
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _sum_own_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(world * N, ...) partial sums on each rank -> this rank's N rows of their sum."""
    TRAFFIC.add(x, group)
    dist.all_reduce(x, group=group)
    n = x.shape[0] // dist.get_world_size(group)
    rank = dist.get_rank(group)
    return x[rank * n:(rank + 1) * n]


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Block q of ``x``'s rows (world equal blocks) goes to rank q; returns the blocks every
    rank sent here, in rank order."""
    out = torch.empty_like(x)
    TRAFFIC.add(x, group)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


class _VocabRows(nn.Module):
    """A frozen (V, H) matrix of which this rank holds rows ``[start, stop)``, zero-padded to
    ``per_rank`` rows (a non-persistent buffer: never saved, as the base is not).

    Args:
        full: the (V, H) weight; this rank's rows are copied out of it.
        rank, world: this rank's place in ``group`` and the group's size.
        group: the ranks that split the rows and compute together (None: every rank; HSDP:
            a replica group, so that the activations never leave it).
    """

    weight: torch.Tensor  # the registered buffer (declared for type checkers)

    def __init__(self, full: torch.Tensor, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.rows, self.cols = full.shape
        self.start, self.stop, self.per_rank = vocab_rows(full.shape[0], rank, world)
        self.register_buffer("weight", _slice(full.detach(), rank, world), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.rows} x {self.cols}, rows [{self.start}, {self.stop}) here"


class VocabParallelEmbedding(_VocabRows):
    """``nn.Embedding`` (frozen), split by rows (:class:`_VocabRows`)."""

    num_embeddings = property(lambda self: self.rows)  # nn.Embedding's names, for code that reads them
    embedding_dim = property(lambda self: self.cols)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H); a collective (every rank, same shape)."""
        every = _all_gather_rows(ids.reshape(-1), self.group) - self.start
        mine = (every >= 0) & (every < self.stop - self.start)
        rows = F.embedding(every.clamp(0, self.per_rank - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return _sum_own_rows(rows, self.group).reshape(*ids.shape, self.cols)


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, vocab: int, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        x = hidden.reshape(-1, hidden.shape[-1])
        n = x.shape[0]
        every = _all_gather_rows(x, group)  # (world * n, H): every rank's tokens
        w = weight.to(x.dtype)
        # my vocabulary slice of everyone's logits, block q for rank q -> the blocks of my tokens
        mine = _all_to_all(every @ w.t(), group)  # (world * n, per): rank r's slice of my n tokens
        logits = mine.view(world, n, -1).transpose(0, 1).reshape(n, -1)[:, :vocab]
        # only the weight: it is frozen, so the backward needs no input (world * n rows of H,
        # held from the forward to the backward for nothing before)
        ctx.save_for_backward(w)
        ctx.vocab, ctx.shape, ctx.group = vocab, hidden.shape, group
        return logits.reshape(*hidden.shape[:-1], vocab)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        world, per = dist.get_world_size(ctx.group), w.shape[0]
        g = grad.reshape(-1, ctx.vocab)
        n = g.shape[0]
        # block q: the gradient of rank q's vocabulary slice for my tokens, (n, per), written
        # in one copy (cast to the weight's dtype on the way): a padded and a transposed copy
        # of the whole (n, V) gradient before, both held through the all-to-all
        send = g.new_empty((world, n, per), dtype=w.dtype)
        for q in range(world):
            lo, hi = min(q * per, ctx.vocab), min((q + 1) * per, ctx.vocab)
            send[q, :, : hi - lo] = g[:, lo:hi]
            send[q, :, hi - lo:] = 0  # the padded rows' logits were dropped
        # rank r gets the gradient of its slice for every rank's tokens
        mine = _all_to_all(send.view(world * n, per), ctx.group)
        del send
        return _sum_own_rows(mine @ w, ctx.group).reshape(ctx.shape), None, None, None


class VocabParallelHead(_VocabRows):
    """A bias-free output ``nn.Linear`` (frozen), split by rows (:class:`_VocabRows`)."""

    out_features = property(lambda self: self.rows)  # nn.Linear's names, for code that reads them
    in_features = property(lambda self: self.cols)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits of this rank's tokens; a collective (every rank, same shape)."""
        return _Head.apply(hidden, self.weight, self.rows, self.group)


def splittable(module: nn.Module, model: nn.Module) -> bool:
    """Whether ``module`` is the model's input embedding or output head in a form this module
    can split (a plain ``nn.Embedding``, a bias-free plain ``nn.Linear``), frozen."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    if type(module) is nn.Embedding:
        return module is cast("PreTrainedModel", model).get_input_embeddings()
    get_head = getattr(model, "get_output_embeddings", None)
    return type(module) is nn.Linear and module.bias is None and callable(get_head) and module is get_head()


def split(model: nn.Module, name: str, rank: int, world: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replaces the loaded module ``name`` (:func:`splittable`) by its vocabulary-parallel
    form holding this rank's rows of ``world`` (its place ``rank`` in ``group``; None: every
    rank), in place; the full weight is dropped. Returns the new module."""
    module = model.get_submodule(name)
    cls = VocabParallelEmbedding if isinstance(module, nn.Embedding) else VocabParallelHead
    new = cls(cast(torch.Tensor, module.weight), rank, world, group)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new
