"""FSDP2 with 4-bit codes on torch releases before integer-parameter support (torch <= 2.11).

torch 2.11 (seen on an H200) fails to shard a uint8 parameter and, under mixed precision,
casts the codes to bf16 numbers. This machine's torch has both fixed, so the old mixed
precision rule is put back in place of torch's (the real method's code minus its integer
clause) to show that the old rule corrupts the 4-bit forward and that the workaround
restores it bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("bitsandbytes")

from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

from raclora_dist.backends import fsdp2_compat
from raclora_dist.quant import QuantizationConfig
from raclora_dist.quant.bnb import quantize_model


@pytest.fixture()
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _old_init_dtype_attrs(self, mp_policy):
    """torch 2.11's rule: every parameter whose dtype differs is cast to param_dtype."""
    param_dtype, reduce_dtype = mp_policy.param_dtype, mp_policy.reduce_dtype
    self.orig_dtype = self.sharded_param.dtype
    if reduce_dtype == param_dtype:
        reduce_dtype = None
    if param_dtype == self.orig_dtype:
        param_dtype = None
    self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    quantize_model(model, QuantizationConfig(method="nf4", compute_dtype="bfloat16"), "uint8")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sharded_output(shard, x):
    model = _model()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        shard(layer, mp_policy=mp)
    shard(model, mp_policy=mp)
    with torch.no_grad():
        return model(x)


def test_integer_safe_parameter_default():
    codes = fsdp2_compat.IntegerSafeNN.Parameter(torch.zeros(4, dtype=torch.uint8))
    assert isinstance(codes, nn.Parameter) and not codes.requires_grad
    assert fsdp2_compat.IntegerSafeNN.Parameter(torch.zeros(4)).requires_grad
    assert fsdp2_compat.IntegerSafeNN().Linear is nn.Linear  # the rest of torch.nn, unchanged


def test_old_mixed_precision_rule_corrupts_codes_and_the_workaround_keeps_them(one_process_group, monkeypatch):
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = _model()(x.bfloat16())
    assert torch.equal(_sharded_output(fully_shard, x), want)  # this torch: right as it is

    monkeypatch.setattr(FSDPParam, "init_dtype_attrs", _old_init_dtype_attrs)
    assert not fsdp2_compat.keeps_integer_params_uncast()
    try:
        broken = _sharded_output(fully_shard, x)
    except (RuntimeError, ValueError, AssertionError):
        broken = None  # the cast codes may not even have the codes' shape
    assert broken is None or not torch.equal(broken, want)
    assert torch.equal(_sharded_output(fsdp2_compat.fully_shard_4bit, x), want)


def test_forced_integer_safe_sharding(one_process_group):
    module = nn.Module()
    module.codes = nn.Parameter(torch.arange(8, dtype=torch.uint8).view(8, 1), requires_grad=False)
    module.w = nn.Parameter(torch.ones(4))
    with fsdp2_compat._integer_safe_parameters():
        fully_shard(module)
    assert module.codes.dtype == torch.uint8 and not module.codes.requires_grad and module.w.requires_grad
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    assert _fsdp_param.nn is nn  # restored
