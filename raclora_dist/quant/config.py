"""The ``model.quantization`` section: how the base's linear layers are held in 4 bits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class QuantizationConfig(BaseModel):
    """bitsandbytes 4-bit settings (QLoRA's); ``model.quantization: nf4`` is shorthand for
    ``{method: nf4}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "nf4", "fp4"] = Field("none", description="4-bit data type of the base's linear layers, or none.")
    double_quant: bool = Field(True, description="Quantize the per-block absmax constants too (QLoRA's double quantization).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit matmul computes in (bfloat16 on GPUs; float32 on CPUs without bf16 units)."
    )
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the packed 4-bit codes are stored as (bitsandbytes quant_storage); auto = uint8: "
        "FSDP2 and ZeRO-3 shard it, and mixed precision never casts an integer tensor."
    )
    blocksize: Literal[32, 64, 128, 256] = Field(64, description="Elements per absmax block.")
    skip_modules: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Linear layers (name suffixes) kept in model.dtype."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"method": data} if isinstance(data, str) else data

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def storage(self) -> str:
        """The packed storage dtype. uint8 by default: FSDP2 (which casts floating-point
        parameters to its param_dtype) and DeepSpeed bf16 (``module.bfloat16()``) would
        turn float-stored codes into different bits; both shard a uint8 tensor as is
        (measured: forward and chain equal to one process, docs/benchmarks.md)."""
        return "uint8" if self.storage_dtype == "auto" else self.storage_dtype
