"""The chain: link lifecycle and the coordinated merge/resample protocol (docs/method.md, "The boundary protocol").

``RacLoraChain`` owns the wrapped layers and the record of merged links. The boundary is
split in two calls that the trainer makes between two optimizer steps:

* :meth:`RacLoraChain.end_link` -- guard (all-reduced finiteness), optional averaging,
  merge, record;
* :meth:`RacLoraChain.start_link` -- deterministic resample, zero factors, all-reduced
  fingerprint check.

Collectives go through a tiny :class:`Comm` protocol, so the same code runs in one process
(:class:`LocalComm`) and under any distributed backend.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from raclora_dist.core.layer import LayerSpec, MergeView, RacLoraLinear
from raclora_dist.core.outer import OuterStep
from raclora_dist.core.sketch import sample_sketch


class Comm(Protocol):
    """The collectives the chain needs; each returns the reduced tensor (may be in place).
    ``rank``: this process's rank (0 in one process)."""

    @property
    def rank(self) -> int: ...

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalComm:
    """One process: every reduction is the identity."""

    rank = 0

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FactorAccess(Protocol):
    """How the chain reaches a layer's factor and weight under a given engine.

    Sharding engines keep the trainable factor and the base weight as shards (FSDP2) or
    partitions with optimizer master copies (DeepSpeed ZeRO); each backend supplies an
    implementation. Every method may be collective: all ranks call it, in layer order.
    """

    def local_finite(self, layer: RacLoraLinear) -> bool:
        """Whether this rank's part of the trainable factor is finite."""
        ...

    def full_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        """The whole trainable factor (B (m, r) or A (r, n)), identical on every rank."""
        ...

    def local_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        """This rank's part of the trainable factor, a tensor that may be written in place
        (the whole factor where it is not sharded). Link-sync averages these."""
        ...

    def merge_view(self, layer: RacLoraLinear) -> contextlib.AbstractContextManager[MergeView]:
        """Hands the layer the tensors its merge edits (``layer.merge_target``: the chain, the
        whole packed base, or this rank's dense rows) and, on a clean exit, writes them back
        to where the engine keeps them. On an exception nothing is written back."""
        ...

    def zero_factor(self, layer: RacLoraLinear) -> None:
        """Zeroes the trainable factor everywhere it lives (incl. optimizer master copies)."""
        ...


class DenseAccess:
    """Unsharded layers (one process, DDP, ZeRO-2): the factor and weight are plain tensors
    (replicated engines merge the same full copy on every rank)."""

    def local_finite(self, layer: RacLoraLinear) -> bool:
        return layer.is_finite()

    def full_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        return layer.factor.detach()

    def local_factor(self, layer: RacLoraLinear) -> torch.Tensor:
        return layer.factor.detach()

    @contextlib.contextmanager
    def merge_view(self, layer: RacLoraLinear) -> Iterator[MergeView]:
        yield layer.local_view()  # the layer's own tensors: edited in place, nothing to write back

    @torch.no_grad()
    def zero_factor(self, layer: RacLoraLinear) -> None:
        layer.factor.zero_()


class SketchMismatchError(RuntimeError):
    """Ranks hold different sketches for the same link: the chain is inconsistent."""


class NonFiniteFactorError(FloatingPointError):
    """A trainable factor is non-finite at a boundary and the config says stop."""


@dataclass
class LinkRecord:
    """What one link boundary did (one line of ``metrics.jsonl`` with ``type: link``)."""

    link: int
    merged: bool
    update_norm: float = 0.0  # ||sum over modules of s B_t A_t||_F (root of summed squares)
    cumulative_update_norm: float = 0.0  # sum of update norms: an upper bound on ||W - W0||_F
    merge_time_s: float = 0.0
    # The share of the intended update sum_l s B_l A_l that reached the effective weights:
    # its projection <dW_eff, dW> / ||dW||^2, the norm ratio ||dW_eff|| / ||dW|| and their
    # cosine (fraction = ratio * cosine). 1 when the merge is exact; a 4-bit in-place
    # requantization rounds a small update away (fraction well below 1).
    landed_fraction: float = float("nan")
    landed_norm_ratio: float = float("nan")
    landed_cosine: float = float("nan")
    discarded_energy: float = 0.0  # factored mode: share of chain energy a recompression dropped (max over layers)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"type": "link", **asdict(self)}


@dataclass
class ChainState:
    """Everything needed to rebuild the chain on a fresh base (sketches are regenerated)."""

    merged: list[int] = field(default_factory=list)  # link indices merged, in order
    skipped: list[int] = field(default_factory=list)  # links discarded by the finite guard
    factors: MutableMapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # link -> name -> CPU factor
    cumulative_update_norm: float = 0.0


class RacLoraChain:
    """The chain over a model's wrapped layers.

    Args:
        layers: wrapped layers by qualified name (from :func:`inject`), in model order.
        on_nonfinite: ``skip_link`` discards a link whose factor is not finite on some rank;
            ``stop`` raises :class:`NonFiniteFactorError`.
        access: how factors and weights are reached (a backend sets it; dense by default).

    Attributes:
        after_merge: called after each layer's merge (None: nothing). A sharded run on CPUs
            hands the C heap back there (``model.heap``): each merge gathers a weight, and the
            holes its gather leaves would otherwise pile up over the boundary (measured on
            ZeRO-3: +240 MiB of RSS per rank over 91 layers, its peak above the steps').
    """

    def __init__(self, layers: dict[str, RacLoraLinear], on_nonfinite: str = "skip_link",
                 access: FactorAccess | None = None) -> None:
        if not layers:
            raise ValueError("a chain needs at least one wrapped layer")
        self.layers = layers
        self.on_nonfinite = on_nonfinite
        self.access: FactorAccess = access or DenseAccess()
        self.state = ChainState()
        self.link = -1
        self.after_merge: Callable[[], object] | None = None

    # -- parameters ---------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable factors, one per layer, in model order."""
        return [layer.factor for layer in self.layers.values()]

    def num_trainable(self) -> int:
        """Elements trained per link over the whole model, from the layers' shapes: the same on
        every rank whatever holds the factors (a ZeRO-3 rank's own partition may be empty)."""
        return sum(layer.rank * (layer.out_features if layer.side == "right" else layer.in_features)
                   for layer in self.layers.values())

    # -- boundary, second half: resample + verify ---------------------------------------
    def start_link(self, link: int, comm: Comm | None = None) -> None:
        """Draws every layer's sketch for ``link``, zeroes the factors, checks agreement.

        In place on every layer. The model's output is unchanged by this call.

        Raises:
            SketchMismatchError: the ranks' sketches differ; names the first module.
        """
        for layer in self.layers.values():
            layer.draw_sketch(link)
            self.access.zero_factor(layer)
        self.link = link
        self.verify_sketches(comm or LocalComm())

    def keeps_master(self) -> bool:
        """Whether the layers keep a master copy of their weights (``raclora.master_weights``):
        a merge then rounds from the master, and one link's landed fraction is not the run's."""
        return any(layer.master is not None for layer in self.layers.values())

    def fingerprints(self) -> torch.Tensor:
        """Per-layer sketch hashes, int64, shape (num_layers,)."""
        return torch.tensor([layer.fingerprint() for layer in self.layers.values()], dtype=torch.int64)

    def verify_sketches(self, comm: Comm) -> None:
        """All-reduces (max and min) the fingerprints; any difference is an error."""
        fp = self.fingerprints()
        hi, lo = comm.all_reduce_max(fp.clone()), comm.all_reduce_min(fp.clone())
        bad = (hi != lo).nonzero().flatten().tolist()
        if bad:
            names = list(self.layers)
            raise SketchMismatchError(
                f"link {self.link}: ranks hold different sketches for module {names[bad[0]]!r} "
                f"({len(bad)} module(s) differ); every rank must use the same raclora.seed"
            )

    # -- boundary, first half: guard + (average) + merge + record ------------------------
    def all_finite(self, comm: Comm | None = None) -> bool:
        """Whether every factor on every rank is finite (one all-reduce of a flag)."""
        # A list, not a generator: all() would stop early and skip a collective on some ranks.
        ok = torch.tensor([int(all([self.access.local_finite(layer) for layer in self.layers.values()]))])
        return bool((comm or LocalComm()).all_reduce_min(ok).item())

    def end_link(self, comm: Comm | None = None, average: bool | Comm = False,
                 payload: torch.dtype = torch.float32, outer: OuterStep | None = None) -> LinkRecord:
        """Ends the current link on this rank: guard, (average), merge, record.

        Args:
            comm: collectives; every rank must call this at the same step.
            average: link-sync (federated) mode: the groups trained their factors apart; one
                all-reduce of all layers' local factors (:meth:`FactorAccess.local_factor`:
                the whole factors, or under a sharding engine this rank's shards, averaged
                with the ranks of the other groups that hold the same shard) averages them
                in place first (after the guard, so a non-finite factor on one rank never
                reaches the others), and every rank merges the same mean. Within a link the
                sketch is shared, so the mean of the factors is exactly the mean of the
                groups' updates, ``s (mean B_i) A``. True: over ``comm``; a :class:`Comm`:
                over its ranks.
            payload: with ``average``, the dtype the factors travel in (bf16: half the bytes;
                the sum and the division by the ranks in it, the outer step and merge in fp32).
            outer: with ``average``, the outer step that turns the mean into the merged factor
                (:mod:`raclora_dist.core.outer`: ``link_outer_lr`` times the mean, from this
                link's sync rounds' anchor; reset here); None: the plain mean. The record keeps
                the factor merged, so replay needs nothing else.

        Returns:
            The link's record. A link discarded by the guard merges nothing anywhere.
        """
        comm = comm or LocalComm()
        t0 = time.perf_counter()
        if not self.all_finite(comm):
            if self.on_nonfinite == "stop":
                raise NonFiniteFactorError(
                    f"link {self.link}: a trainable factor is non-finite on some rank; nothing merged"
                )
            self.state.skipped.append(self.link)
            return LinkRecord(self.link, merged=False, reason="non-finite factor; link discarded",
                              cumulative_update_norm=self.state.cumulative_update_norm)
        sq, discarded = 0.0, 0.0
        landed = torch.zeros(3, dtype=torch.float64)
        factors: dict[str, torch.Tensor] = {}
        if average is not False:
            outer = outer or OuterStep()
            self._outer_round(comm if isinstance(average, bool) else average, outer, payload)
            outer.reset()
        fulls = {name: self.access.full_factor(layer) for name, layer in self.layers.items()}
        for name, layer in self.layers.items():
            full = fulls[name]
            factors[name] = full.detach().to("cpu", torch.float32, copy=True)
            with torch.no_grad(), self.access.merge_view(layer) as view:
                res = layer.merge_link(full, view)  # the math, in one place, for every engine
            self.access.zero_factor(layer)
            if self.after_merge is not None:
                self.after_merge()
            sq += res.norm**2
            if res.rows_only or comm.rank == 0:  # whole-layer statistics: rank 0's count once
                landed += res.landed
            discarded = max(discarded, res.discarded)
        # One small all-reduce gives the whole model's (row parts add up; whole layers once).
        inner, dd, ii = comm.all_reduce_sum(landed).tolist()
        rec = self._record(self.link, factors, sq**0.5, time.perf_counter() - t0)
        if ii > 0:
            rec.landed_fraction = inner / ii
            rec.landed_norm_ratio = (dd / ii) ** 0.5
            rec.landed_cosine = inner / (dd * ii) ** 0.5 if dd > 0 else 0.0
        rec.discarded_energy = discarded
        return rec

    def sync_round(self, comm: Comm, average: bool | Comm, outer: OuterStep,
                   payload: torch.dtype = torch.float32) -> bool:
        """A sync round inside a link (link-sync with ``distributed.link_sync_rounds`` > 1):
        the groups' factors are averaged and every group continues from the outer step's new
        anchor (in place). Skipped when a factor is non-finite on some rank (the boundary's
        guard then discards the link). Collective. Returns whether it synced."""
        if not self.all_finite(comm):
            return False
        self._outer_round(comm if isinstance(average, bool) else average, outer, payload)
        return True

    def _outer_round(self, comm: Comm, outer: OuterStep, payload: torch.dtype) -> None:
        local = {name: self.access.local_factor(layer) for name, layer in self.layers.items()}
        outer.apply(local, _mean_over_ranks(local, comm, payload))

    def _record(self, link: int, factors: dict[str, torch.Tensor], norm: float, secs: float) -> LinkRecord:
        self.state.merged.append(link)
        self.state.factors[link] = factors
        self.state.cumulative_update_norm += norm
        return LinkRecord(link, merged=True, update_norm=norm, merge_time_s=secs,
                          cumulative_update_norm=self.state.cumulative_update_norm)

    # -- rebuild and export ----------------------------------------------------------------
    def replay(self, state: ChainState) -> None:
        """Re-applies a recorded chain to a fresh base, link by link per layer (in place).

        Deterministic: on CPU the resulting weights are bitwise those of the original run
        (each layer's merges are independent of the others', so the order across layers
        does not matter).
        """
        for layer in self.layers.values():
            replay_layer(layer, state)
        self.adopt(state)

    def adopt(self, state: ChainState) -> None:
        """Takes over a recorded chain whose merges the layers already hold (a copy)."""
        self.state = ChainState(
            merged=list(state.merged), skipped=list(state.skipped),
            factors=dict(state.factors), cumulative_update_norm=state.cumulative_update_norm,
        )


@torch.no_grad()
def _mean_over_ranks(tensors: dict[str, torch.Tensor], comm: Comm,
                     payload: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every rank's tensors averaged, in one all-reduce of their flat concatenation (in
    ``payload``; the mean is returned in the tensors' dtypes)."""
    flat = torch.cat([t.detach().float().flatten() for t in tensors.values()]).to(payload)
    flat = comm.all_reduce_mean(flat).float()
    out, i = {}, 0
    for name, t in tensors.items():
        out[name] = flat[i : i + t.numel()].view_as(t).to(t.dtype)
        i += t.numel()
    return out


@torch.no_grad()
def replay_layer(layer: RacLoraLinear, state: ChainState) -> None:
    """Re-applies every merged link of ``state`` to one unsharded layer, in order (in place).

    Loading streams the base one part at a time, so each layer is replayed as soon as its
    base weight is real and before an engine shards it.
    """
    for link in state.merged:
        layer.resample(link)
        layer.merge(state.factors[link][layer.name])


def link_factors(layer: LayerSpec, state: ChainState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rebuilds ``(B_t (m, r), A_t (r, n))`` of a layer's merged links from the record.

    Args:
        layer: the layer's spec (``RacLoraLinear.spec``, or one read from a checkpoint).
        state: the chain record holding each merged link's trained factor.

    The sketches are regenerated from ``(seed, link, name)``.
    """
    d = layer.in_features if layer.side == "right" else layer.out_features
    out = []
    for link in state.merged:
        sk = sample_sketch(layer.dist, layer.rank, d, seed=layer.seed, link=link, name=layer.key)
        f = state.factors[link][layer.name].float()
        out.append((f, sk) if layer.side == "right" else (sk.T, f))
    return out
