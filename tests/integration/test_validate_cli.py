"""``raclora validate`` as users run it: the estimate and the chain's warning on the console."""

from __future__ import annotations

from tests.helpers import run_cli, tiny_config, write_config


def test_validate_prints_the_parameter_count_and_the_per_rank_estimate(small_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run",
                                                        distributed={"strategy": "fsdp2", "workers": 2}))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layers targeted" in out and "M parameters" in out and "fsdp2 x 2" in out
    for row in ("base weights", "chain", "gradients", "optimizer state", "activations", "total"):
        assert row in out, row


def test_validate_shows_the_merged_chain_at_the_last_link_and_warns_when_it_outgrows_the_base(small_data, tmp_path):
    raclora = {"links": 40, "merge_mode": "factored", "chain_budget": None}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", raclora=raclora))
    out = run_cli("validate", str(cfg))
    assert out.returncode == 0 and "merged chain at link 40" in out.stdout and "warning: the merged chain" in out.stderr
