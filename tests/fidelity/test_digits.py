"""A small, fixed-seed version of the paper's Table 3 transfer experiment (sklearn digits)."""

import pytest

from benchmarks.fidelity.digits import experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result():
    return experiment(seeds=2, links=12, steps=30)


def test_pretraining_does_not_transfer(result):
    assert result["pretrain_acc_on_0_4"] > 95 and result["zero_shot_acc_on_5_9"] < 40


def test_ordering_matches_the_paper(result):
    acc = {m: v["acc_mean"] for m, v in result["methods"].items()}
    assert acc["full_ft"] >= max(acc.values()) - 0.5          # full fine-tuning is best
    assert abs(acc["rac_left"] - acc["cola"]) < 4              # RAC-LoRA ~ COLA
    assert acc["rac_left"] > acc["asym_lora"] + 30              # >> Asymmetric LoRA
    assert acc["cola"] > acc["asym_lora"] + 30
    assert acc["lora"] > acc["asym_lora"] + 20                  # LoRA > Asymmetric LoRA
    assert acc["rac_left"] > acc["rac_right"] + 5               # the better-conditioned side wins


def test_trainable_parameters_counted_the_papers_way(result):
    n = {m: v["trainable"] for m, v in result["methods"].items()}
    assert n["rac_right"] == 64 + 64 + 5      # right sketch trains B: sum of out features
    assert n["rac_left"] == 64 + 64 + 64      # left sketch trains A: sum of in features
    assert n["lora"] == n["cola"] == (64 + 64) + (64 + 64) + (64 + 5)
