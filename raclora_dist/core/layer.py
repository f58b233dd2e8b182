"""``RacLoraLinear``: one link of the chain around a base linear layer.

Shapes (``W`` is the base weight, ``(m, n) = (out_features, in_features)``):

* right sketch: ``A`` (r, n) is the frozen sketch (a buffer), ``B`` (m, r) trains;
* left sketch:  ``B`` (m, r) is the frozen sketch (a buffer), ``A`` (r, n) trains.

The update of the current link is ``s * B @ A``; forward multiplies through rank r and
never forms it. Merged links either go into the base weight (``into_base``) or are kept as
frozen factors ``chain_B (m, R)``, ``chain_A (R, n)`` with the scale folded into
``chain_B`` (``factored``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, cast

import torch
from torch import nn

from raclora_dist.core.landed import (
    MergeResult,
    block_rows,
    landed_stats,
    lowrank_fro_norm,
    lowrank_landed,
    merge_rows_into_weight,
)
from raclora_dist.core.lowrank import append_to_chain, chain_product
from raclora_dist.core.master import ROUND_BLOCK, Gather, gather_rows, row_chunk, stochastic_round_rows
from raclora_dist.core.sketch import sample_sketch, tensor_fingerprint

Side = Literal["left", "right"]
MergeMode = Literal["into_base", "factored"]
MergeTarget = Literal["chain", "packed", "rows"]


@dataclass
class MergeView:
    """The tensors of one layer that a merge may edit (in place), as an engine hands them over.

    The engine owns the bytes: it gathers what :attr:`RacLoraLinear.merge_target` names, builds
    the view, and writes the edited tensors back to its shards afterwards. The layer owns the
    math (:meth:`RacLoraLinear.merge_link`) and never asks where the tensors came from.

    Attributes:
        weight: ``rows`` target: the dense weight's rows ``row_start:row_start + rows`` (the
            whole (m, n) weight, or this rank's row chunk); ``packed`` target: the whole packed
            4-bit codes (P, 1), overwritten with the new codes. Unused for ``chain``.
        row_start: the first global row of ``weight`` (``rows`` target).
        rows_only: ``weight`` holds only this rank's rows; the ranks' landed statistics then
            add up to the layer's (:class:`MergeResult`).
        chain_B: (m, cap), chain_A: (cap, n): the whole factored chain (``chain`` target).
        gather: collects a sharded master copy's slices from all ranks (collective,
            ``gather(local_flat, total) -> whole flat``); None: this process holds it all.
        owner: whether this rank's landed statistics count: of a whole layer, only rank 0's
            (a 4-bit merge may skip the extra dequantize elsewhere); of ``rows_only`` rows, one
            replica's (HSDP's other replica groups merge the same rows).
    """

    weight: torch.Tensor | None = None
    row_start: int = 0
    rows_only: bool = False
    chain_B: torch.Tensor | None = None
    chain_A: torch.Tensor | None = None
    gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    owner: bool = True


def auto_merge_mode(*, packed: bool, rounds: bool, master_weights: str = "none",
                    stochastic_rounding: bool | str = "auto") -> MergeMode:
    """``merge_mode: auto`` for a base: ``factored`` on a packed 4-bit base (exact, the codes
    untouched); ``into_base`` on an fp32 base (exact) and on a bf16/fp16 one, whose merge then
    rounds stochastically or from a master copy (measured as close to the exact chain, at no
    chain's cost: docs/benchmarks.md, merge fidelity); ``factored`` on a bf16/fp16 base whose
    merge would round to nearest (both options off), which rounds a small update away.

    Args:
        packed: the base is packed 4-bit codes. rounds: a merge into the base rounds (bf16/fp16).
    """
    if packed or (rounds and master_weights == "none" and stochastic_rounding is False):
        return "factored"
    return "into_base"


def resolve_chain_dtype(chain_dtype: torch.dtype | str, *, rounds: bool,
                        factor_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """``raclora.chain_dtype`` for a base: ``auto`` is bf16 where merging into the base rounds
    (a 4-bit, bf16 or fp16 base; the chain's rounding is far below the base's own), else the
    factor's dtype. rounds: :meth:`RacLoraLinear.rounds_merges`."""
    if chain_dtype == "auto":
        return torch.bfloat16 if rounds else factor_dtype
    return getattr(torch, chain_dtype) if isinstance(chain_dtype, str) else chain_dtype


class RankError(ValueError):
    """The rank does not fit a target layer's sketched dimension."""


def resolve_side(side: str, out_features: int, in_features: int) -> Side:
    """Picks the sketched side; ``auto`` sketches the smaller dimension (right on a tie).

    The convergence rate scales with r/d of the sketched side (docs/method.md), so the
    smaller d wins: a left sketch has d = m (out), a right sketch d = n (in).
    """
    if side == "auto":
        return "left" if out_features < in_features else "right"
    if side not in ("left", "right"):
        raise ValueError(f"sketch side must be left, right or auto, got {side!r}")
    return side  # type: ignore[return-value]


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class LayerSpec:
    """What rebuilds a layer's sketches and exports its chain, without the layer itself."""

    name: str
    side: Side
    rank: int
    dist: str
    seed: int
    scale: float
    out_features: int
    in_features: int
    sketch_key: str = ""  # the name sketches are drawn under; a sketch group's shared key, else ``name``

    @property
    def key(self) -> str:
        return self.sketch_key or self.name

    def to_dict(self) -> dict:
        return asdict(self)


class SharedProjection:
    """Computes ``x A^T`` once for a group of right-sketched layers that read the same input
    with the same sketch (q/k/v, gate/up), and hands it to each member in turn.

    The cached result is dropped once every member has taken it, or as soon as a different
    input arrives (checked by identity), so it never outlives one forward.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._x: torch.Tensor | None = None
        self._xa: torch.Tensor | None = None
        self._uses = 0

    def project(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``x (..., n) @ A.T (n, r)`` -> (..., r), shared across the group's members."""
        if self._x is not x or self._xa is None:
            self._x, self._xa, self._uses = x, x @ A.T, 0
        xa = self._xa
        self._uses += 1
        if self._uses >= self.size:
            self._x = self._xa = None
        return xa


class RacLoraLinear(nn.Module):
    """Wraps a base linear layer with one trainable RAC-LoRA factor and a frozen sketch.

    Args:
        base_layer: the wrapped layer; must expose ``weight`` of shape (m, n) and
            ``in_features``/``out_features``. Its parameters are frozen here.
        name: the module's qualified name in the model: part of the sketch key.
        rank: r. Must not exceed the sketched side's dimension.
        alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        side: ``left`` or ``right`` (resolve ``auto`` with :func:`resolve_side` first).
        dist: the sketch distribution (see :func:`sample_sketch`).
        seed: the chain's seed.
        merge_mode: ``into_base``, ``factored``, or ``auto`` (the base type's default:
            :meth:`default_merge_mode`).
        chain_capacity: for ``factored``, the most chain columns kept (R_max, at most
            min(m, n)); merging past it recompresses the chain by SVD. Ignored for ``into_base``.
        factor_dtype: dtype of the trainable factor and sketch (fp32 by default).
        chain_dtype: dtype the factored chain is held in: a dtype, ``float32``, ``bfloat16``, or
            ``auto``: bf16 on a base held below fp32 (4-bit, bf16, fp16), where its rounding is
            far below the base's own; else ``factor_dtype``.
        master_weights: ``into_base`` on a bf16/fp16 or 4-bit base: ``none``, or a fp32 master
            copy on the ``cpu`` or the ``device`` (core/master.py).
        stochastic_rounding: ``into_base`` on such a base: round merges stochastically; ``auto``:
            on for a dense bf16/fp16 base merged ``into_base`` without a master copy.
    """

    # For type checkers: nn.Module's __getattr__ types buffers and submodules Tensor | Module.
    base_layer: nn.Module
    sketch: torch.Tensor
    chain_B: torch.Tensor
    chain_A: torch.Tensor
    _master: torch.Tensor

    def __init__(
        self,
        base_layer: nn.Module,
        name: str,
        *,
        rank: int,
        alpha: float,
        side: Side,
        dist: str = "orthogonal",
        seed: int = 0,
        rslora: bool = False,
        merge_mode: str = "into_base",
        chain_capacity: int = 0,
        factor_dtype: torch.dtype = torch.float32,
        chain_dtype: torch.dtype | str = "auto",
        master_weights: str = "none",
        stochastic_rounding: bool | str = "auto",
    ) -> None:
        super().__init__()
        m, n = cast(int, base_layer.out_features), cast(int, base_layer.in_features)
        d = n if side == "right" else m
        if rank > d:
            raise RankError(
                f"rank {rank} exceeds the sketched dimension {d} of module {name!r} "
                f"(weight shape ({m}, {n}), {side} sketch)"
            )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.name, self.rank, self.side, self.dist, self.seed = name, rank, side, dist, seed
        self.scale = lora_scale(alpha, rank, rslora)
        if merge_mode == "auto":
            merge_mode = self.default_merge_mode(master_weights, stochastic_rounding)
        self.merge_mode: MergeMode = merge_mode  # type: ignore[assignment]
        self.sketch_link = -1  # the link whose sketch the buffer holds (keys stochastic rounding)
        self.sketch_key = name  # the name sketches are drawn under (a sketch group's shared key)
        self.shared: SharedProjection | None = None  # a sketch group's, set by :func:`inject`
        self.out_features, self.in_features = m, n
        dev = self.base_weight.device
        sketch_shape = (rank, n) if side == "right" else (m, rank)
        factor_shape = (m, rank) if side == "right" else (rank, n)
        # A buffer (never sharded, reduced or optimized), not persistent: regenerated from (seed, link, name).
        self.register_buffer(
            "sketch", torch.zeros(sketch_shape, dtype=factor_dtype, device=dev), persistent=False
        )
        self.factor = nn.Parameter(torch.zeros(factor_shape, dtype=factor_dtype, device=dev))
        # A chain of rank min(m, n) already spans every (m, n) matrix: recompressing to it
        # loses nothing, and more columns would cost more than a dense copy.
        cap = min(chain_capacity, m, n) if self.merge_mode == "factored" else 0
        cdt = resolve_chain_dtype(chain_dtype, rounds=self.rounds_merges(), factor_dtype=factor_dtype)
        if cap:
            # Frozen parameters, not buffers: sharding engines then shard them like the base
            # (chain_B's rows with W's rows) and gather them for the forward.
            self.chain_B = nn.Parameter(torch.zeros(m, cap, dtype=cdt, device=dev), requires_grad=False)
            self.chain_A = nn.Parameter(torch.zeros(cap, n, dtype=cdt, device=dev), requires_grad=False)
        else:
            self.register_buffer("chain_B", torch.zeros(m, 0, dtype=cdt, device=dev), persistent=False)
            self.register_buffer("chain_A", torch.zeros(0, n, dtype=cdt, device=dev), persistent=False)
        self.chain_rank = 0
        self._init_master(master_weights, stochastic_rounding)

    def _init_master(self, master_weights: str, stochastic_rounding: bool | str) -> None:
        """Sets up the precise merge of ``into_base`` on a low-precision base (core/master.py)."""
        self._rounding = stochastic_rounding  # "auto" is judged at each merge: see stochastic_rounding
        if master_weights != "none" or stochastic_rounding is True:
            if self.merge_mode != "into_base":
                raise ValueError(f"module {self.name!r}: raclora.master_weights and raclora.stochastic_rounding "
                                 f"need raclora.merge_mode=into_base, not {self.merge_mode!r}")
            if not self.rounds_merges():
                raise ValueError(f"module {self.name!r}: raclora.master_weights and raclora.stochastic_rounding "
                                 f"apply to bf16, fp16 and 4-bit bases; this base is {self.base_weight.dtype}, "
                                 "which merges exactly")
        self.master_weights = master_weights
        self.master_rows = (0, self.out_features)  # this rank's rows of the master (all of them unsharded)
        self.master_world = 1  # the ranks the master's rows are split over
        self._cpu_master: torch.Tensor | None = None
        if master_weights != "none":
            source = self.master_source().float().clone()  # (m, n) fp32
            if master_weights == "device":
                self.register_buffer("_master", source, persistent=False)
            else:  # a plain attribute: model.to(device) leaves it on the CPU
                self._cpu_master = source

    # -- what engines may ask of a layer (declared here; a 4-bit layer overrides them) ----------
    packed_base = False
    """True: the base weight is packed codes, merged on the whole weight (engines gather it
    first); False: a dense weight, merged row by row."""

    @property
    def merge_target(self) -> MergeTarget:
        """What a merge edits, so that an engine knows what to gather into the :class:`MergeView`:
        ``chain`` (the factored chain), ``packed`` (the whole packed base) or ``rows`` (the dense
        weight, any row chunk)."""
        if self.merge_mode == "factored":
            return "chain"
        return "packed" if self.packed_base else "rows"

    @property
    def stochastic_rounding(self) -> bool:
        """Whether a merge rounds stochastically: as configured, or for ``auto`` when a merge
        into this base rounds and no master copy is kept. ``auto`` is judged at each merge, on
        the weight as it is then: an engine may cast the base after wrapping (DeepSpeed's
        bf16 casts the whole module), and a fp32 base's exact merge then becomes a rounding one."""
        if self._rounding != "auto":
            return bool(self._rounding)
        return self.merge_mode == "into_base" and self.master is None and not self.packed_base and self.rounds_merges()

    @property
    def base_weight(self) -> torch.Tensor:
        """The wrapped layer's ``weight`` (a 4-bit layer's: its packed codes)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def rounds_merges(self) -> bool:
        """Whether merging into this base rounds (a bf16/fp16 or 4-bit weight): where a master
        copy or stochastic rounding applies."""
        dtype = self.base_weight.dtype
        return not (dtype.is_floating_point and torch.finfo(dtype).bits >= 32)

    def master_source(self) -> torch.Tensor:
        """The (m, n) weight a master copy starts from (a 4-bit layer: the original weights)."""
        return self.base_weight.detach()

    @property
    def master(self) -> torch.Tensor | None:
        """This rank's rows :attr:`master_rows` of the fp32 master copy (k, n), or None."""
        return self._cpu_master if self._cpu_master is not None else getattr(self, "_master", None)

    @torch.no_grad()
    def shard_master(self, rank: int, world: int) -> None:
        """Keeps only this rank's row chunk of the master copy (FSDP2's ``Shard(0)`` rows; frees
        the rest). Idempotent: a master already sharded is left as it is; no master, nothing."""
        if self.master is None or self.master_rows != (0, self.out_features):
            return
        lo, hi = row_chunk(self.out_features, rank, world)
        local = self.master[lo:hi].clone()
        if self._cpu_master is not None:
            self._cpu_master = local
        else:
            self._master = local
        self.master_rows, self.master_world = (lo, hi), world

    def _held_master(self) -> torch.Tensor:
        if self.master is None:
            raise RuntimeError(f"module {self.name!r} keeps no master copy (raclora.master_weights: none)")
        return self.master

    @torch.no_grad()
    def add_to_master(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """``master += s B A`` on this rank's rows of the master (in place), a row block at a time."""
        lo, hi = self.master_rows
        master = self._held_master()
        step = block_rows(master.shape[1])
        for i in range(lo, hi, step):
            j = min(hi, i + step)
            block = master[i - lo : j - lo]
            block.addmm_(B[i:j].float().to(block.device), A.float().to(block.device), alpha=self.scale)

    def master_rows_of(self, row_start: int, rows: int, gather: Gather | None) -> torch.Tensor:
        """The master's fp32 rows ``row_start : row_start + rows`` (a view of this rank's chunk,
        or gathered from every rank: collective when ``gather`` is given and needed)."""
        lo, hi = self.master_rows
        master = self._held_master()
        if lo <= row_start and row_start + rows <= hi:
            return master[row_start - lo : row_start - lo + rows]
        if gather is None:
            raise RuntimeError(f"module {self.name!r}: the merge needs master rows {row_start}..{row_start + rows} "
                               f"but this rank holds {lo}..{hi} and the engine gave no gather")
        whole = gather_rows(master, self.out_features, self.master_world, gather)
        return whole[row_start : row_start + rows]

    def default_merge_mode(self, master_weights: str = "none", stochastic_rounding: bool | str = "auto") -> MergeMode:
        """``auto``'s choice for this base (:func:`auto_merge_mode`)."""
        return auto_merge_mode(packed=self.packed_base, rounds=self.rounds_merges(), master_weights=master_weights,
                               stochastic_rounding=stochastic_rounding)

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.name, self.side, self.rank, self.dist, self.seed, self.scale,
                         self.out_features, self.in_features, "" if self.sketch_key == self.name else self.sketch_key)

    # -- the two factors, whichever side is sketched ---------------------------------
    @property
    def lora_A(self) -> torch.Tensor:
        """``A`` (r, n): the sketch for a right sketch, the trainable factor for a left one."""
        return self.sketch if self.side == "right" else self.factor

    @property
    def lora_B(self) -> torch.Tensor:
        """``B`` (m, r): the trainable factor for a right sketch, the sketch for a left one."""
        return self.factor if self.side == "right" else self.sketch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = base(x) + x A_chain^T B_chain^T + s (x A^T) B^T``; x: (..., n) -> (..., m)."""
        y = self.base_layer(x)
        # The factor's dtype as the engine presents it (bf16 under FSDP2 mixed precision,
        # which casts parameters but not buffers): sketch and chain follow it. No-op in fp32.
        dt = self.factor.dtype
        xa = x.to(dt)
        if self.chain_rank:
            R = self.chain_rank
            y = y + chain_product(xa, self.chain_A[:R], self.chain_B[:, :R]).to(y.dtype)
        # Through rank r: (..., n) -> (..., r) -> (..., m). For a right sketch the first
        # product involves no trainable tensor, so autograd keeps only the rank-r h (and the
        # frozen sketch) for the backward; a sketch group computes it once for all members.
        if self.side == "right":
            A = self.sketch.to(dt)
            h = self.shared.project(xa, A) if self.shared is not None else xa @ A.T
        else:
            h = xa @ self.factor.T
        B = self.lora_B.to(dt)
        if y.dtype == dt:
            # One fused kernel for scale, product and sum: y + s * h @ B^T.
            return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.T,
                               alpha=self.scale).view(y.shape)
        return y + (self.scale * (h @ B.T)).to(y.dtype)

    # -- link lifecycle ---------------------------------------------------------------
    @torch.no_grad()
    def draw_sketch(self, link: int) -> None:
        """Sets the sketch buffer to link ``link``'s sketch (in place); the factor is untouched."""
        d = self.in_features if self.side == "right" else self.out_features
        s = sample_sketch(self.dist, self.rank, d, seed=self.seed, link=link, name=self.sketch_key)
        self.sketch.copy_(s if self.side == "right" else s.T)
        self.sketch_link = link

    @torch.no_grad()
    def resample(self, link: int) -> None:
        """Starts link ``link``: draws its sketch and zeroes the trainable factor (in place).

        With the factor at zero the layer's output equals that before the call.
        """
        self.draw_sketch(link)
        self.factor.zero_()

    def factors_with(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (m, r), A (r, n))`` for a full trainable factor and the current sketch.

        Raises:
            FloatingPointError: the factor holds a non-finite value (it must never be merged).
        """
        if not torch.isfinite(factor).all():
            raise FloatingPointError(f"refusing to merge a non-finite factor in {self.name!r}")
        f = factor.to(self.sketch)
        return (f, self.sketch) if self.side == "right" else (self.sketch, f)

    def fingerprint(self) -> int:
        """A 62-bit hash of the current sketch, for the cross-rank consistency check."""
        return tensor_fingerprint(self.sketch)

    def delta(self) -> torch.Tensor:
        """The current link's dense update ``s * B @ A``, shape (m, n), in factor dtype."""
        return self.scale * (self.lora_B.detach() @ self.lora_A.detach())

    def is_finite(self) -> bool:
        """Whether the trainable factor holds only finite values."""
        return bool(torch.isfinite(self.factor).all())

    def local_view(self) -> MergeView:
        """The :class:`MergeView` of an unsharded layer: its own tensors, edited in place."""
        return MergeView(weight=self.base_weight.data, chain_B=self.chain_B, chain_A=self.chain_A)

    @torch.no_grad()
    def merge(self, factor: torch.Tensor | None = None) -> MergeResult:
        """Merges the link ``s * B @ A`` (in place) on an unsharded layer.

        The merged factor is consumed: ``self.factor`` is zeroed afterwards, so the layer's
        output equals the merged model's (no update is counted twice).

        Args:
            factor: the trained factor to merge; defaults to ``self.factor``. Replaying a
                chain from a checkpoint passes the stored factor of each link.

        Returns:
            The merge's norm and landed statistics (this process owns the whole layer).

        Raises:
            FloatingPointError: if the factor holds a non-finite value; nothing is merged.
        """
        res = self.merge_link(self.factor if factor is None else factor, self.local_view())
        self.factor.zero_()
        return res

    @torch.no_grad()
    def merge_link(self, factor: torch.Tensor, view: MergeView) -> MergeResult:
        """The one merge entry point: adds the link ``s B A`` into the tensors of ``view`` (in
        place), whichever the merge mode and however the engine holds the layer.

        The trainable factor itself is left as it is (the engine zeroes it where it lives).

        Args:
            factor: the whole trained factor, B (m, r) or A (r, n).
            view: what the engine gathered for :attr:`merge_target`.

        Raises:
            FloatingPointError: the factor holds a non-finite value; nothing is merged.
        """
        B, A = self.factors_with(factor)
        if self.merge_target == "chain":
            if view.chain_B is None or view.chain_A is None:
                raise ValueError(f"module {self.name!r}: a chain merge's view must hold chain_B and chain_A")
            return self.merge_into_chain(view.chain_B, view.chain_A, B, A)
        return self.merge_into_base(view, B, A)

    def merge_into_base(self, view: MergeView, B: torch.Tensor, A: torch.Tensor) -> MergeResult:
        """``W[rows] += s B[rows] A`` on the dense rows in ``view`` (in place); the 4-bit layer
        overrides it with a requantizing merge of the whole packed weight.

        With a master copy, the master takes the link and the rows are rounded from it afresh;
        with stochastic rounding, the rounding to the weight's dtype is unbiased."""
        W = view.weight
        if W is None:
            raise ValueError(f"module {self.name!r}: a rows merge's view must hold the weight's rows")
        landed = torch.zeros(3, dtype=torch.float64)
        rows = B[view.row_start : view.row_start + W.shape[0]]
        if self.master is not None:
            self.add_to_master(B, A)
            source = self.master_rows_of(view.row_start, W.shape[0], view.gather)
            landed = self._round_rows_into(W, view.row_start, rows, A, source)
        elif self.stochastic_rounding:
            landed = self._round_rows_into(W, view.row_start, rows, A, None)
        elif W.shape[0]:  # a rank may own no rows of a small layer
            landed = merge_rows_into_weight(W, rows, A, self.scale)
        if not view.owner:
            landed = torch.zeros(3, dtype=torch.float64)  # another replica counts these rows
        return MergeResult(self.scale * lowrank_fro_norm(B, A), landed, rows_only=view.rows_only)

    @torch.no_grad()
    def _round_rows_into(self, W: torch.Tensor, row_start: int, B: torch.Tensor, A: torch.Tensor,
                         source: torch.Tensor | None) -> torch.Tensor:
        """Sets ``W`` (k, n), global rows ``row_start:``, to ``source`` (the master's rows) or to
        ``W + s B A``, rounded to W's dtype (stochastically if set), a block at a time (in place).

        Returns the landed statistics of the change (:func:`landed_stats`)."""
        landed = torch.zeros(3, dtype=torch.float64)
        step = -(-block_rows(W.shape[1]) // ROUND_BLOCK) * ROUND_BLOCK  # whole rounding streams per block
        for i in range(0, W.shape[0], step):
            rows = W[i : i + step]
            before = rows.float()
            intended = self.scale * (B[i : i + step].float() @ A.float()).to(before.device)
            target = source[i : i + rows.shape[0]].to(before.device) if source is not None else before + intended
            if self.stochastic_rounding:
                new = stochastic_round_rows(target, rows.dtype, row_start + i, seed=self.seed, link=self.sketch_link,
                                            name=self.name)
            else:
                new = target.to(rows.dtype)
            landed += landed_stats(new.float() - before, intended)
            rows.copy_(new)
        return landed

    @torch.no_grad()
    def merge_into_chain(self, chain_B: torch.Tensor, chain_A: torch.Tensor,
                         B: torch.Tensor, A: torch.Tensor) -> MergeResult:
        """Appends ``s B (m, r)``, ``A (r, n)`` to the full chain tensors (in place),
        recompressing to the capacity when full (:func:`append_to_chain`).

        Args:
            chain_B: (m, cap), chain_A: (cap, n): the whole chain (gathered if sharded).
        """
        sB = self.scale * B
        norm = self.scale * lowrank_fro_norm(B, A)
        self.chain_rank, discarded, dB, dA = append_to_chain(chain_B, chain_A, self.chain_rank, sB, A)
        return MergeResult(norm, lowrank_landed(dB, dA, sB, A), discarded)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense (m, n) fp32 weight the forward applies, chain included (unsharded layer)."""
        W = self.dense_base_weight()
        if self.chain_rank:
            R = self.chain_rank
            W = W + self.chain_B[:, :R].float() @ self.chain_A[:R].float()
        return W + self.delta().float()

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense (m, n) fp32 tensor (quantized subclasses dequantize)."""
        return self.base_weight.detach().float()

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, side={self.side}, dist={self.dist}, scale={self.scale:g}, "
            f"merge_mode={self.merge_mode}"
        )
