"""ZeRO-3's gathered-parameter limits filled from the model (backends/deepspeed.py)."""

from raclora_dist.backends.deepspeed import fill_stage3_limits


def test_unset_limits_are_one_block_and_the_users_values_stay():
    ds = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 5}}
    fill_stage3_limits(ds, 1000)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 5, "stage3_max_reuse_distance": 1000,
                                       "stage3_prefetch_bucket_size": 1000}
    # a large model's block (Llama-3-70B: 0.86 B parameters) keeps DeepSpeed's smaller defaults
    large = {"zero_optimization": {"stage": 3}}
    fill_stage3_limits(large, 856_000_000)
    assert large["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 856_000_000,
                                          "stage3_max_reuse_distance": 856_000_000,
                                          "stage3_prefetch_bucket_size": 50_000_000}
    untouched = {"zero_optimization": {"stage": 3}}
    fill_stage3_limits(untouched, 0)  # no decoder blocks: DeepSpeed's defaults
    assert untouched == {"zero_optimization": {"stage": 3}}


def test_on_cpus_nothing_is_prefetched_or_kept_for_reuse():
    """On CPUs a prefetched or kept block is one more gathered block per rank (0.77x against
    0.70x the checkpoint, docs/benchmarks.md): both are 0 unless the dict sets them."""
    ds = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 7}}
    fill_stage3_limits(ds, 1000, on_cpu=True)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 7, "stage3_max_live_parameters": 1000,
                                       "stage3_max_reuse_distance": 0}
