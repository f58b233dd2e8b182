"""The throughput benchmark compares like with like (correctness only, no timing asserted)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # it runs the benchmark itself, every method


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_short_benchmark_trains_every_method_on_the_same_model_and_batches(tmp_path, corpus, quant):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--json", str(out), "--sizes", "tiny",
                           "--rounds", "1", "--window", "1", "--warmup", "1", "--no-rss", "--quant", quant],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["sizes"]["tiny"]["methods"]
    adapters = {"peft_lora", "rac_right", "rac_left", "rac_shared"}
    assert set(res) == (adapters if quant == "nf4" else adapters | {"full"})  # 4-bit weights cannot be trained
    # same (4-bit) model, same first batch: every adapter starts at zero, so every loss is the base's
    losses = [r["initial_loss"] for r in res.values()]
    assert max(losses) - min(losses) < 1e-6
    # and they trained: the losses moved, and each method took the same number of steps
    assert all(r["loss_at_equal_steps"] != r["initial_loss"] for r in res.values())
    assert len({r["steps"] for r in res.values()}) == 1
    # RAC-LoRA trains one factor per layer: a right sketch trains B (m, r) alone, LoRA both
    # (m + n) r. tiny: per layer m = 32+16+16+32+64+64+32 = 256 and n = 6*32+64 = 256; 2 layers, r 8
    assert res["rac_right"]["trainable_params"] == 2 * 256 * 8
    assert res["peft_lora"]["trainable_params"] == 2 * (256 + 256) * 8
    assert 0 < res["rac_right"]["merge_share_at_100_steps"] < 1
    assert res["peft_lora"]["tokens_per_s_vs_peft"] == 1.0
