"""benchmarks.scale runs end to end at a tiny size (correctness of the harness, no numbers judged)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


@pytest.mark.slow
def test_scale_benchmark_loads_a_written_checkpoint_through_the_product(tmp_path, corpus):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--json", str(out), "--size", "tiny",
                           "--cases", "fsdp2", "--act-seq", "64", "--act-steps", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # tiny: 4 blocks of (64x64 q, 64x32 k/v, 64x64 o, 3 x 64x160 MLP, 2 x 64 norms), 2 x 512x64, 64 norm
    per_block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64
    assert res["checkpoint"]["params"] == 4 * per_block + 2 * 512 * 64 + 64
    assert res["checkpoint"]["bytes"] == 4 * res["checkpoint"]["params"]  # fp32
    (case,) = res["after"]
    assert case["case"] == "fsdp2" and len(case["peak_rss_mb_first_step"]) == 2  # one value per worker
    assert all(p > s > 0 for p, s in zip(case["peak_rss_mb_first_step"], case["rss_mb_start"], strict=False))
    assert case["load_s"] > 0 and case["first_step_s"] > 0 and case["tokens_per_s"] > 0
    assert [a["activation_checkpointing"] for a in res["activations"]] == [False, True]
    assert "x checkpoint" in proc.stdout and "held with / without" in proc.stdout
