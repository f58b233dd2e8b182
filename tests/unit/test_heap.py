"""The C heap under CPU runs: its freed pages are handed back between decoder blocks."""

from __future__ import annotations

import subprocess
import sys

import torch

from raclora_dist.backends.base import decoder_layers
from raclora_dist.config import build_config
from raclora_dist.model import heap
from raclora_dist.model.session import build_session
from tests.helpers import TINY_MODEL, tiny_config

HOLES = """
import ctypes, torch
from raclora_dist.model.heap import release_freed
ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # the steady threshold: 1 MiB tensors come from the heap
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
kept = [torch.ones(1 << 18) for _ in range(96)]  # 96 x 1 MiB, written
del kept[::2]  # 48 MiB of holes between tensors that stay
before = rss()
assert release_freed()
print(before - rss())
"""


def test_release_freed_returns_the_holes_between_live_tensors():
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 40  # MiB of the 48 freed inside the heap left the process


def test_release_between_blocks_trims_after_each_blocks_forward_and_before_its_backward(small_data, tmp_path,
                                                                                       monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed", lambda: calls.append(torch.is_grad_enabled()) or True)
    layers = TINY_MODEL["num_hidden_layers"]
    session = build_session(build_config(tiny_config(small_data, tmp_path / "run")))
    assert len(calls) == 1  # once, as loading ends; a one-process run trims nothing more
    calls.clear()
    heap.release_between_blocks(decoder_layers(session.model))
    session.chain.start_link(0)
    tokens = torch.randint(0, 256, (2, 16))
    loss = session.model(tokens, labels=tokens).loss
    assert len(calls) == layers  # one per block's forward
    loss.backward()
    assert len(calls) == 2 * layers  # and one as each block's backward begins
    assert not any(calls[layers:])  # (the backward runs with grad mode off)
    with torch.no_grad():
        session.model(tokens)
    assert len(calls) == 2 * layers  # evaluation and generation save nothing between blocks: no trims


def test_only_sharded_runs_on_cpu_with_blocks_gathered_from_maps_trim_between_blocks():
    big, small = heap.STEADY_MMAP_THRESHOLD, heap.STEADY_MMAP_THRESHOLD - 1
    assert heap.worth_releasing("cpu", True, big)
    assert not heap.worth_releasing("cpu", True, small)  # a toy model: the page faults would cost 28 %
    assert not heap.worth_releasing("cpu", False, big)  # replicated (single, ddp, ZeRO-2)
    assert not heap.worth_releasing("cuda", True, big)  # activations are not in the C heap


def test_the_mmap_threshold_after_loading_is_glibcs_own_setting_when_the_user_gave_one(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert heap.steady_mmap_threshold() == heap.STEADY_MMAP_THRESHOLD == 8 << 20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert heap.steady_mmap_threshold() == 1 << 20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "a lot")  # glibc ignores what it cannot read; so do we
    assert heap.steady_mmap_threshold() == heap.STEADY_MMAP_THRESHOLD
