"""The ``raclora`` section of the run config: everything the chain itself needs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RacLoraConfig(BaseModel):
    """RAC-LoRA chain settings (validated on construction)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, description="r: rank of each link.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale alpha/r (alpha/sqrt(r) with rslora).")
    rslora: bool = Field(False, description="Use rsLoRA's scale alpha/sqrt(r).")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="PEFT conventions: a list of name suffixes, or one regex matching whole names.",
    )
    sketch_side: Literal["left", "right", "auto"] = Field(
        "auto", description="Which factor is the frozen random sketch; auto sketches the smaller dimension."
    )
    sketch_dist: Literal["orthogonal", "gaussian", "kaiming_uniform"] = Field(
        "orthogonal", description="Distribution of each link's sketch."
    )
    sketch_groups: list[list[str]] = Field(
        default_factory=list,
        description="Projections that read the same input (e.g. [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]) share one "
        "right sketch per link: RAC-LoRA on their fused matrix, with x A^T computed once. Members are right-sketched.",
    )
    links: int = Field(4, ge=1, description="T: number of links in the chain.")
    steps_per_link: int = Field(50, ge=1, description="K: optimizer steps per link.")
    merge_mode: Literal["auto", "into_base", "factored"] = Field(
        "auto", description="Merge links into the base weight, or keep them as frozen factors; auto: into_base on fp32 "
        "bases (exact) and on bf16/fp16 bases (with stochastic rounding, or into a master copy), factored on 4-bit "
        "bases (docs/benchmarks.md, merge fidelity).",
    )
    master_weights: Literal["none", "device", "cpu"] = Field(
        "none", description="into_base on a bf16/fp16 or 4-bit base: keep a fp32 master copy (row chunks, sharded "
        "like the base) on the device or the CPU, merge into it and round (requantize) the working weight from it; "
        "none: merge into the working weight itself.",
    )
    stochastic_rounding: bool | Literal["auto"] = Field(
        "auto", description="into_base on a bf16/fp16 or 4-bit base: round the merged weight to the base's dtype (or "
        "4-bit grid) stochastically, unbiased, instead of to nearest. auto: on for a bf16/fp16 base merged into_base "
        "without a master copy, off elsewhere.",
    )
    allow_lossy_merge: bool = Field(
        False, description="Allow into_base on a 4-bit base with neither master_weights nor stochastic_rounding "
        "(requantizing in place drops most of a small update: docs/benchmarks.md, merge fidelity).",
    )
    chain_budget: float | None = Field(
        0.1, gt=0, le=1, description="factored mode: the most each layer's merged chain may cost, as a fraction of the "
        "layer (R (m + n) <= budget m n: per-token compute, and elements held); past it the chain is recompressed by "
        "SVD to that rank and the energy dropped is logged (discarded_energy). null: the exact chain, whose memory and "
        "step time grow with every link.",
    )
    chain_links: int | None = Field(
        3, ge=1, description="factored mode, with chain_budget: each layer's merged chain also keeps at most this many "
        "links' rank (chain_links r columns), so that it stays a small share of a 4-bit base at any width (Llama-3-8B "
        "shapes, NF4, r 16: 9 % at link 100). null: chain_budget alone.",
    )
    chain_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="factored mode: the dtype the merged chain is held in. auto: bfloat16 on a base held below "
        "fp32 (4-bit, bf16, fp16), half the chain's memory and traffic at a rounding far below the base's own "
        "(docs/benchmarks.md, long chains); float32 on a fp32 base. Products and recompressions run in fp32 or the "
        "compute dtype either way.",
    )
    max_chain_rank: int | None = Field(
        None, ge=1, description="factored mode: a fixed cap on each layer's kept chain rank (recompressed by SVD past "
        "it); overrides chain_budget.",
    )
    optimizer_state: Literal["reset", "keep"] = Field(
        "reset", description="At each link boundary, reset the optimizer state of the factor or keep it."
    )
    on_nonfinite: Literal["skip_link", "stop"] = Field(
        "skip_link", description="A non-finite factor at a boundary: discard the link, or stop the run."
    )
    seed: int = Field(0, description="Chain seed: sketches are a pure function of (seed, link, module name).")

    @model_validator(mode="after")
    def _targets_not_empty(self) -> RacLoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        return self

    @model_validator(mode="after")
    def _sketch_groups_share_the_right_sketch(self) -> RacLoraConfig:
        if self.sketch_groups and self.sketch_side == "left":
            raise ValueError("sketch_groups share the input-side (right) sketch; they need sketch_side right or auto")
        if any(len(g) < 2 for g in self.sketch_groups):
            raise ValueError(f"each of sketch_groups needs at least two module names, got {self.sketch_groups}")
        return self

    @model_validator(mode="after")
    def _master_weights_need_into_base(self) -> RacLoraConfig:
        # (auto is into_base on the bases where they apply; a 4-bit base's auto is checked with the model)
        if (self.master_weights != "none" or self.stochastic_rounding is True) and self.merge_mode == "factored":
            raise ValueError("master_weights and stochastic_rounding need merge_mode into_base (or auto on a bf16/fp16 "
                             "base), got merge_mode 'factored'")
        return self

    @model_validator(mode="after")
    def _chain_cap_holds_a_link(self) -> RacLoraConfig:
        if self.max_chain_rank is not None and self.max_chain_rank < self.rank:
            raise ValueError(f"max_chain_rank ({self.max_chain_rank}) must be >= rank ({self.rank})")
        return self

    def chain_capacity(self, out_features: int, in_features: int) -> int:
        """Chain columns preallocated for an (m, n) layer in factored mode: ``links * r``,
        lowered to ``max_chain_rank``, or to what ``chain_budget`` allows and to
        ``chain_links * r`` (at least one link's r, at most min(m, n), where a chain already
        spans every matrix)."""
        m, n = out_features, in_features
        cap = self.links * self.rank
        if self.max_chain_rank:
            cap = min(cap, self.max_chain_rank)
        elif self.chain_budget:
            cap = min(cap, max(self.rank, int(self.chain_budget * m * n / (m + n))))
            if self.chain_links:
                cap = min(cap, self.chain_links * self.rank)
        return min(cap, m, n)
