"""The torch dtype a config names: the one place a dtype's name becomes a ``torch.dtype``."""

from __future__ import annotations

import torch


def torch_dtype(name: str) -> torch.dtype:
    """``torch.float32`` for ``"float32"``, and so on for every dtype torch names.

    Raises:
        ValueError: ``name`` is not a torch dtype.
    """
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype
