"""The paper's quadratic counterexample, run through the product's layer and chain."""

import math

import pytest

from benchmarks.fidelity.quadratic import L, pl_bound, problem, run_method, statistics_f0

SEEDS = range(3)
LINKS = 150


@pytest.mark.parametrize("side", ["rac_right", "rac_left"])
def test_rac_lora_beats_the_pl_rate_bound(side):
    gamma = 1 / L
    finals = [run_method(side, s, gamma, LINKS)[-1] for s in SEEDS]
    bound = pl_bound(statistics_f0(len(SEEDS)), gamma, LINKS)[-1]  # a bound on the expected gap
    assert sum(finals) / len(finals) < bound
    assert max(finals) < 1e-3  # measured: ~1e-4 x the bound


def test_fixed_sketch_stalls_far_from_the_optimum():
    # Asymmetric LoRA (the same sketch every link) can only move W in one subspace: a broken
    # resampling in the chain would make RAC-LoRA look like this.
    finals = [run_method("asym_lora", s, 1 / L, LINKS)[-1] for s in SEEDS]
    assert min(finals) > 0.5


def test_lora_fails_at_step_one_over_l():
    finals = [run_method("lora", s, 1 / L, LINKS)[-1] for s in SEEDS]
    assert all(not math.isfinite(x) or x > 0.5 for x in finals)


def test_problem_is_the_papers():
    w_star, m = problem(0)
    assert w_star.shape == (3, 3) and m.tolist() == [10.0] + [1.0] * 8
