"""FSDP2 on the torch releases that predate its support for integer parameters.

A 4-bit base is sharded as its packed codes, a frozen ``uint8`` parameter. Up to torch 2.11
(measured on an H200 with torch 2.11.0+cu130), ``fully_shard`` mishandles such a parameter
twice (pytorch/pytorch#177844, fixed in later releases):

1. it wraps each shard as ``nn.Parameter(dtensor)`` and sets ``requires_grad`` afterwards,
   and the default ``requires_grad=True`` is an error for an integer tensor;
2. with a mixed-precision ``param_dtype`` it casts every parameter to that dtype for the
   all-gather, so the codes arrive as bf16 numbers, not as the bytes bitsandbytes reads: the
   4-bit base silently becomes other weights (seen as a loss that barely moves).

:func:`fully_shard_4bit` works around both where this torch needs it, and only there:
(1) for the time of one ``fully_shard`` call, the name ``nn`` in torch's FSDP2 parameter
module resolves ``Parameter`` with ``requires_grad`` False for integer tensors; (2) each
integer parameter's ``init_dtype_attrs`` clears its ``param_dtype`` after torch computed it,
as later torch does. Nothing else in torch changes.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import MethodType
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


class IntegerSafeNN:
    """``torch.nn`` with one change: ``Parameter(data)`` leaves ``requires_grad`` False for
    integer tensors."""

    def __getattr__(self, name: str):
        return getattr(nn, name)

    @staticmethod
    def Parameter(data: torch.Tensor | None = None, requires_grad: bool | None = None) -> nn.Parameter:
        if requires_grad is None:
            requires_grad = data is None or data.is_floating_point() or data.is_complex()
        return nn.Parameter(data, requires_grad=requires_grad)  # type: ignore[arg-type]  # torch's own default is None


def shards_integer_params() -> bool:
    """Whether this torch's ``fully_shard`` creates a frozen integer shard without error."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    return "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)


def keeps_integer_params_uncast() -> bool:
    """Whether this torch's mixed precision leaves non-floating parameters as they are."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    return "is_floating_point" in inspect.getsource(FSDPParam.init_dtype_attrs)


@contextmanager
def _integer_safe_parameters():
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    _fsdp_param.nn = IntegerSafeNN()
    try:
        yield
    finally:
        _fsdp_param.nn = nn


def _init_dtype_attrs_uncast(self, mp_policy) -> None:
    type(self).init_dtype_attrs(self, mp_policy)
    if not self.orig_dtype.is_floating_point:
        self.param_dtype = None  # all-gathered as the bytes they are


def fully_shard_4bit(module: nn.Module, **kwargs) -> None:
    """``torch.distributed.fsdp.fully_shard(module, **kwargs)`` that also shards frozen
    integer parameters (4-bit codes) correctly on older torch (module docstring)."""
    from torch.distributed.fsdp import fully_shard

    if all(p.is_floating_point() or p.is_complex() for p in module.parameters()):
        fully_shard(module, **kwargs)
        return
    if shards_integer_params():
        fully_shard(module, **kwargs)
    else:
        with _integer_safe_parameters():
            fully_shard(module, **kwargs)
    if keeps_integer_params_uncast():
        return
    group = cast("FSDPModule", module)._get_fsdp_state()._fsdp_param_group
    for fsdp_param in group.fsdp_params if group is not None else []:
        if not (fsdp_param.sharded_param.is_floating_point() or fsdp_param.sharded_param.is_complex()):
            fsdp_param.init_dtype_attrs = MethodType(_init_dtype_attrs_uncast, fsdp_param)  # type: ignore[method-assign]
