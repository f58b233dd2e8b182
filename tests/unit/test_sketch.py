"""Sketches: determinism across processes, independence across links, distributions."""

import subprocess
import sys

import pytest
import torch

from raclora_dist.core import sample_sketch, tensor_fingerprint

DISTS = ["orthogonal", "gaussian", "kaiming_uniform"]


def test_same_key_gives_same_sketch_in_another_process():
    here = [tensor_fingerprint(sample_sketch(d, 4, 48, seed=7, link=3, name="model.layers.0.q_proj")) for d in DISTS]
    code = (
        "from raclora_dist.core import sample_sketch, tensor_fingerprint\n"
        f"print([tensor_fingerprint(sample_sketch(d, 4, 48, seed=7, link=3, name='model.layers.0.q_proj')) for d in {DISTS!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(out.stdout.strip()) == here


@pytest.mark.parametrize("dist", DISTS)
def test_key_parts_each_change_the_sketch(dist):
    base = sample_sketch(dist, 4, 48, seed=0, link=0, name="a")
    for other in (dict(seed=1, link=0, name="a"), dict(seed=0, link=1, name="a"), dict(seed=0, link=0, name="b")):
        assert not torch.equal(base, sample_sketch(dist, 4, 48, **other))


def test_no_sketch_is_reused_over_a_long_chain():
    fps = {tensor_fingerprint(sample_sketch("orthogonal", 2, 16, seed=0, link=t, name="m")) for t in range(500)}
    assert len(fps) == 500


def test_links_are_independent_projections():
    # E[H_A] = (r/d) I for a rotation-invariant sketch (docs/method.md); a reused or correlated
    # sketch would concentrate the average on a fixed subspace.
    r, d, n = 2, 8, 4000
    H = torch.zeros(d, d, dtype=torch.float64)
    for t in range(n):
        A = sample_sketch("orthogonal", r, d, seed=0, link=t, name="m").double()
        H += A.T @ A
    assert torch.allclose(H / n, torch.eye(d, dtype=torch.float64) * r / d, atol=0.03)


def test_orthogonal_rows_are_orthonormal():
    A = sample_sketch("orthogonal", 6, 40, seed=0, link=0, name="m")
    assert torch.allclose(A @ A.T, torch.eye(6), atol=1e-6)


def test_gaussian_and_kaiming_scales():
    g = sample_sketch("gaussian", 64, 256, seed=0, link=0, name="m")
    assert abs(g.var().item() * 256 - 1.0) < 0.05
    k = sample_sketch("kaiming_uniform", 64, 256, seed=0, link=0, name="m")
    assert k.abs().max() <= 1 / 16 and k.abs().max() > 0.95 / 16


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="rank <= dim"):
        sample_sketch("orthogonal", 9, 8, seed=0, link=0, name="m")
    with pytest.raises(ValueError, match="allowed: orthogonal, gaussian, kaiming_uniform"):
        sample_sketch("cauchy", 2, 8, seed=0, link=0, name="m")
