"""The paper's quadratic in the federated setting (link-sync): workers with heterogeneous
local objectives train a link apart, and the averaged factor is merged."""

import pytest

from benchmarks.fidelity.federated import L, pl_bound, run_federated

SEEDS = range(3)
LINKS, K = 150, 4


@pytest.fixture(scope="module")
def finals() -> dict[str, list[float]]:
    return {m: [run_federated(m, s, 1 / L, LINKS, K)[-1] for s in SEEDS] for m in ("rac_link", "fixed_sketch", "fed_lora")}


def test_link_sync_rac_lora_reaches_the_global_optimum_within_the_pl_bound(finals):
    # Measured: gaps of 2e-13 .. 1.4e-11 after 150 links of 4 local steps on 4 workers.
    assert max(finals["rac_link"]) < 1e-6
    for s, gap in zip(SEEDS, finals["rac_link"], strict=False):
        f0 = run_federated("rac_link", s, 1 / L, 0, K)[0]
        assert gap < pl_bound(f0, 1 / L, LINKS)[-1]


def test_a_fixed_sketch_stalls_and_federated_lora_does_not_reach_the_optimum(finals):
    assert min(finals["fixed_sketch"]) > 0.5
    # Averaging B and A apart is not averaging B A: federated LoRA stays far above (or
    # diverges at this step size; measured: 2e-4 and twice inf).
    assert min(finals["fed_lora"]) > 1e3 * max(finals["rac_link"])
