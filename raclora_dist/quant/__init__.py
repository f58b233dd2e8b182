"""4-bit (QLoRA-style) base weights through bitsandbytes.

Only :mod:`raclora_dist.quant.bnb` imports bitsandbytes; importing it registers the
``Linear4bit`` wrapper with the layer dispatch (quantized types first, dense last). The
config section lives in :mod:`raclora_dist.quant.config` and needs nothing heavy.
"""

from raclora_dist.quant.config import QuantizationConfig

__all__ = ["QuantizationConfig"]
