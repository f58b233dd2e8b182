"""Config loading: every bad input is a ConfigError that names the field and what is allowed."""

from pathlib import Path

import pytest

from raclora_dist.config import ConfigError, load_config, parse_overrides
from raclora_dist.train.checks import check_paths
from tests.helpers import tiny_config, write_config


@pytest.fixture
def cfg_file(tmp_path, small_data) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))


def test_valid_config_and_overrides(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=1e-4", "raclora.target_modules=[q_proj]", "raclora.sketch_side=left"])
    assert cfg.train.lr == 1e-4 and cfg.raclora.target_modules == ["q_proj"] and cfg.raclora.sketch_side == "left"
    assert cfg.raclora.links == 3


def test_default_run_dir_is_named_after_the_config(tmp_path, small_data):
    data = tiny_config(small_data, tmp_path)
    del data["run"]
    cfg = load_config(write_config(tmp_path / "my_exp.yaml", data))
    assert cfg.run.dir == str(Path("runs") / "my_exp")


def test_broken_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  config: {model_type: llama\ndata: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(p)


def test_unknown_field_lists_the_allowed_ones(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["train.lrr=0.1"])
    assert "train.lrr: unknown field" in str(e.value) and "lr, betas" in str(e.value)


def test_bad_choice_names_field_value_and_choices(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["raclora.sketch_side=middle"])
    msg = str(e.value)
    assert "raclora.sketch_side" in msg and "'middle'" in msg and "'left', 'right' or 'auto'" in msg


def test_several_errors_are_reported_together(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["raclora.rank=0", "train.optimizer=adam"])
    assert "raclora.rank" in str(e.value) and "train.optimizer" in str(e.value)


def test_model_needs_exactly_one_source(cfg_file):
    with pytest.raises(ConfigError, match=r"exactly one of model.name_or_path and model.config"):
        load_config(cfg_file, ["model.name_or_path=/nowhere"])


def test_missing_files_are_named(cfg_file):
    cfg = load_config(cfg_file, ["data.path=/no/such/file.jsonl"])
    with pytest.raises(ConfigError, match=r"data.path: '/no/such/file.jsonl' does not exist"):
        check_paths(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(cfg_file.parent / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"expected section.field=value"):
        parse_overrides(["train.lr"])
    assert parse_overrides(["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


def test_config_reference_doc_is_current():
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert (ROOT / "docs" / "config.md").read_text() == out.stdout, "regenerate docs/config.md"


def test_cpu_offload_needs_fsdp2_and_gpu_workers(cfg_file):
    with pytest.raises(ConfigError, match=r"cpu_offload.*deepspeed.*offload_optimizer"):
        load_config(cfg_file, ["distributed.strategy=deepspeed", "distributed.workers=2", "distributed.cpu_offload=true"])
    with pytest.raises(ConfigError, match=r"cpu_offload.*ray.use_gpu is false"):
        load_config(cfg_file, ["distributed.strategy=fsdp2", "ray.enabled=true", "distributed.cpu_offload=true"])
    cfg = load_config(cfg_file, ["distributed.strategy=fsdp2", "ray.enabled=true", "ray.use_gpu=true",
                                 "distributed.cpu_offload=true"])
    assert cfg.distributed.cpu_offload


def test_in_place_4bit_merges_are_refused_unless_allowed(cfg_file):
    with pytest.raises(ConfigError, match=r"into_base on a 4-bit base requantizes .*allow_lossy_merge"):
        load_config(cfg_file, ["model.quantization=nf4", "raclora.merge_mode=into_base"])
    for keeps in (["raclora.master_weights=cpu"], ["raclora.stochastic_rounding=true"],
                  ["raclora.allow_lossy_merge=true"], []):
        mode = ["raclora.merge_mode=into_base"] if keeps else []  # [] : auto, which is factored on 4 bits
        load_config(cfg_file, ["model.quantization=nf4", *mode, *keeps])
    load_config(cfg_file, ["raclora.merge_mode=into_base"])  # a dense base merges exactly


def test_the_readme_4bit_quickstart_line_is_exact(tmp_path):
    """README: `raclora train configs/quickstart.yaml model.quantization=nf4 ...` must not land on
    the lossy in-place mode."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml",
                      ["model.quantization=nf4", "ray.enabled=false", "distributed.strategy=single",
                       "distributed.workers=1"])
    assert cfg.raclora.merge_mode == "auto"


@pytest.mark.parametrize("overrides,message", [
    (["distributed.strategy=deepspeed", "distributed.workers=2", "distributed.sync=link"],
     "sync: link needs strategy ddp or fsdp2"),
    (["distributed.strategy=fsdp2", "distributed.workers=4", "distributed.sync=link", "distributed.replicas=2"],
     "with sync: link the groups are sync_groups"),
    (["distributed.strategy=ddp", "distributed.workers=4", "distributed.replicas=2"],
     "replicas: 2 applies to strategy fsdp2, not 'ddp'"),
    (["distributed.strategy=ddp", "distributed.workers=2", "ray.min_workers=1", "ray.enabled=false"],
     "ray.min_workers: elastic sizes come from Ray Train"),
    (["distributed.strategy=ddp", "distributed.workers=2", "ray.min_workers=3", "ray.enabled=true"],
     r"ray.min_workers \(3\) must be at most distributed.workers \(2\)"),
    (["distributed.strategy=ddp", "distributed.workers=4", "ray.min_workers=3", "ray.enabled=true"],
     r"train.batch_size \(4\) must split evenly over every size an elastic run may take \(3, 4 workers; not 3\)"),
    (["distributed.strategy=fsdp2", "distributed.workers=4", "distributed.replicas=2", "ray.min_workers=1",
      "ray.enabled=true"], r"ray.min_workers \(1\) must be a whole number of groups of 2 workers"),
    (["distributed.strategy=deepspeed", "distributed.workers=4",
      "distributed.deepspeed={zero_optimization: {stage: 3, zero_hpz_partition_size: 2}}"],
     "deepspeed.zero_optimization.zero_hpz_partition_size: DeepSpeed's hierarchical partitioning does not run"),
    (["distributed.strategy=deepspeed", "distributed.workers=2", "ray.min_workers=1", "ray.enabled=true"],
     "DeepSpeed's checkpoints resume only with the same number of workers"),
    (["distributed.strategy=ddp", "distributed.workers=4", "distributed.sync=link", "distributed.sync_groups=3"],
     r"sync_groups \(3\) must divide workers \(4\)"),
    (["distributed.strategy=ddp", "distributed.workers=2", "distributed.sync_groups=2"],
     "sync_groups applies to sync: link"),
    (["distributed.strategy=ddp", "distributed.workers=2", "distributed.sync=link", "raclora.optimizer_state=keep"],
     "raclora.optimizer_state: keep with distributed.sync: link"),
    (["distributed.link_outer_lr=1.5"], "link_outer_lr applies to sync: link"),
    (["distributed.sync=links"], r"distributed.sync: Input should be 'step' or 'link' \(got 'links'\)"),
])
def test_link_sync_rules_name_the_field(cfg_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_file, overrides)


@pytest.mark.parametrize("unit", ["sublayer", "linear"])
def test_fsdp_units_inside_a_block_are_fsdp2s(cfg_file, unit):
    with pytest.raises(ConfigError, match=rf"distributed.*fsdp_unit: '{unit}' applies to the fsdp2 strategy, not 'ddp'"):
        load_config(cfg_file, ["distributed.strategy=ddp", "distributed.workers=2", f"distributed.fsdp_unit={unit}"])
    cfg = load_config(cfg_file, ["distributed.strategy=fsdp2", "distributed.workers=2", f"distributed.fsdp_unit={unit}"])
    assert cfg.distributed.fsdp_unit == unit
    assert cfg.distributed.fsdp_unit_on("cpu", 1 << 30) == cfg.distributed.fsdp_unit_on("cuda", 1) == unit


def test_fsdp_unit_auto_is_the_sublayer_on_cpu_workers_for_real_blocks_and_the_block_elsewhere(cfg_file):
    from raclora_dist.config import AUTO_SUBLAYER_BYTES as big

    cfg = load_config(cfg_file, ["distributed.strategy=ddp", "distributed.workers=2"])  # the default fits any engine
    assert cfg.distributed.fsdp_unit == "auto"
    assert cfg.distributed.fsdp_unit_on("cpu", big) == "sublayer"
    assert cfg.distributed.fsdp_unit_on("cpu", big - 1) == "block"  # a toy: collectives' fixed cost dominates
    assert cfg.distributed.fsdp_unit_on("cuda", 100 * big) == "block"


def test_the_chain_budget_is_on_by_default():
    from raclora_dist.core import RacLoraConfig

    assert RacLoraConfig().chain_budget == 0.1 and RacLoraConfig().chain_links == 3
    assert RacLoraConfig(rank=8, links=64).chain_capacity(4096, 4096) == 24  # 3 links x r, under 0.1's 204
    assert RacLoraConfig(rank=8, links=64).chain_capacity(576, 576) == 24  # 3 links, under 0.1's 28
    assert RacLoraConfig(rank=8, links=64).chain_capacity(192, 576) == 14  # 0.1 * 192 * 576 / 768, under 3 links
    assert RacLoraConfig(rank=8, links=64, chain_links=None).chain_capacity(4096, 4096) == 204  # 0.1 * 4096² / 8192
    assert RacLoraConfig(rank=8, links=64).chain_capacity(64, 64) == 8  # at least one link
    assert RacLoraConfig(rank=8, links=2).chain_capacity(4096, 4096) == 16  # never more than the links
    assert RacLoraConfig.model_validate({"chain_budget": 0.1, "chain_links": 2}).chain_capacity(4096, 4096) == 16
    assert RacLoraConfig(rank=8, links=64, chain_budget=None).chain_capacity(4096, 4096) == 512  # links x r
    assert RacLoraConfig(rank=8, links=64, max_chain_rank=32).chain_capacity(4096, 4096) == 32


def test_a_run_folders_config_reads_as_its_release_wrote_it_and_a_users_config_with_todays_defaults(
        cfg_file, tmp_path):
    """Saved run configs carry config_version; one saved before versions spells out every field
    its release had, and the fields it lacks pin the chain it trained (resume, replay, export).
    A user's own config naming the same fields is read with today's defaults."""
    import yaml

    from raclora_dist.config import build_config
    from raclora_dist.config_version import CONFIG_VERSION

    cfg = load_config(cfg_file)
    saved = yaml.safe_load(cfg.to_yaml())
    assert saved["config_version"] == CONFIG_VERSION
    assert build_config(saved, saved=True) == cfg  # a versioned one reads as written

    def era(**raclora):
        data = yaml.safe_load(cfg_file.read_text())
        data["raclora"] = {**data.get("raclora", {}), **raclora}
        return data

    # the release before chain_dtype: the chain in fp32, capped by budget and links as named
    before_dtype = era(chain_budget=0.1, chain_links=3, max_chain_rank=None)
    assert build_config(before_dtype, saved=True).raclora.chain_dtype == "float32"
    assert build_config(before_dtype, saved=True).raclora.chain_links == 3
    # before chain_links: the budget alone; before chain_budget: max_chain_rank null was exact
    assert build_config(era(chain_budget=0.1, max_chain_rank=None), saved=True).raclora.chain_links is None
    assert build_config(era(max_chain_rank=None), saved=True).raclora.chain_budget is None
    assert build_config(era(max_chain_rank=32), saved=True).raclora.chain_budget == 0.1  # capped: as named
    # a user's config naming those fields is not a saved one: today's defaults fill the rest
    user = build_config(before_dtype)
    assert user.raclora.chain_dtype == "auto" and user.raclora.chain_links == 3
    assert build_config(era(max_chain_rank=None)).raclora.chain_budget == 0.1
    # load_config knows a run folder's own config.yaml (beside its checkpoints)
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(before_dtype))
    assert load_config(run / "config.yaml").raclora.chain_dtype == "float32"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(before_dtype))  # a user's file of that name
    assert load_config(tmp_path / "config.yaml").raclora.chain_dtype == "auto"
    # a version from a newer release is refused by name
    with pytest.raises(ConfigError, match=rf"config_version 99: this release reads versions 1 to {CONFIG_VERSION}"):
        build_config({**saved, "config_version": 99}, "runs/x/config.yaml", saved=True)


@pytest.mark.parametrize("section", ["checkpoint: {load_universal: true}", "datastates: {enabled: true}"])
def test_deepspeed_sections_that_change_how_checkpoints_load_are_refused(cfg_file, section):
    """DeepSpeed's universal checkpoints and other engines load pickles with code; the
    product's tensors-only engine is the only way in (SECURITY.md)."""
    with pytest.raises(ConfigError, match=r"deepspeed\.(checkpoint|datastates): raclora manages DeepSpeed's checkpoints"):
        load_config(cfg_file, ["distributed.strategy=deepspeed", "distributed.workers=2",
                               f"distributed.deepspeed={{zero_optimization: {{stage: 2}}, {section}}}"])


def test_a_config_cannot_be_edited_and_changes_are_validated_again(cfg_file):
    """Fields assigned after validation (the k8s renderer did) escaped every cross-field rule."""
    import pydantic

    from raclora_dist.config import with_values

    cfg = load_config(cfg_file)
    for section, field, value in (("distributed", "workers", 3), ("raclora", "rank", 4),
                                  ("model", "dtype", "bfloat16")):
        with pytest.raises(pydantic.ValidationError, match="frozen"):
            setattr(getattr(cfg, section), field, value)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.model.quantization.compute_dtype = "bfloat16"
    with pytest.raises(ConfigError, match=r"train.batch_size \(4\) must be a multiple of distributed.workers \(3\)"):
        with_values(cfg, {"distributed.strategy": "ddp", "distributed.workers": 3}, source="a test")
    changed = with_values(cfg, {"distributed.strategy": "ddp", "distributed.workers": 2})
    assert (changed.distributed.workers, cfg.distributed.workers) == (2, 1)


def test_validation_reads_nothing_from_disk(cfg_file, monkeypatch):
    """A config is validated where the files it names may not exist (a laptop rendering for a
    cluster): the default tokenizer is resolved by the run, not by the schema."""
    import builtins
    import os

    from raclora_dist.config import build_config, read_yaml

    data = read_yaml(cfg_file)
    data["model"] = {"name_or_path": "/nowhere/model"}
    data["data"].pop("tokenizer", None)

    def no_disk(*args, **kwargs):
        raise AssertionError(f"validation touched the disk: {args[:1]}")

    for name in ("stat", "lstat", "listdir", "scandir", "access"):
        monkeypatch.setattr(os, name, no_disk)
    monkeypatch.setattr(builtins, "open", no_disk)
    cfg = build_config(data)
    monkeypatch.undo()
    assert cfg.data.tokenizer is None


@pytest.mark.parametrize("value, name, want", [
    ("ray://alice:hunter2@head:10001", "address", "ray://alice:***@head:10001"),
    ("https://tok3n@mlflow.example.com/", "mlflow_tracking_uri", "https://***@mlflow.example.com/"),
    ("s3://b/p?region=eu&X-Amz-Signature=abc&sig=def", "storage_path", "s3://b/p?region=eu&X-Amz-Signature=***&sig=***"),
    ("sk-abcdef", "wandb_api_key", "***"),
    ("auto", "address", "auto"),
    ("/plain/path", "dir", "/plain/path"),
])
def test_credentials_are_redacted_from_what_trackers_log(value, name, want):
    from raclora_dist.observe.trackers import redact

    cfg = {"section": {name: value, "n": 3}}
    assert redact(cfg) == {"section": {name: want, "n": 3}}
    assert cfg["section"][name] == value  # the config itself is untouched


def test_redaction_leaves_every_config_field_name_alone(cfg_file):
    """Field names such as data.tokenizer or train.sample_tokens are not secrets."""
    from raclora_dist.observe.trackers import flatten, redact

    full = load_config(cfg_file, ["run.mlflow_tracking_uri=http://mlflow:5000"]).model_dump(mode="json")
    assert flatten(redact(full)) == flatten(full)


def test_an_elastic_group_keeps_its_groups_whole_and_the_global_batch(cfg_file):
    """``at_size``: the config a Ray worker runs when the elastic group has other than
    ``distributed.workers`` workers: fewer (or more) groups of the same size, the same batch."""
    from raclora_dist.orchestration.ray_train import at_size

    hsdp = load_config(cfg_file, ["distributed.strategy=fsdp2", "distributed.workers=8", "distributed.replicas=4",
                                  "ray.enabled=true", "ray.min_workers=4", "train.batch_size=24"])
    assert hsdp.elastic_sizes() == [4, 6, 8]
    small = at_size(hsdp, 4)
    assert (small.distributed.workers, small.distributed.replicas, small.train.batch_size) == (4, 2, 24)
    assert at_size(hsdp, 8) is hsdp
    with pytest.raises(ConfigError, match="Ray Train started 5 workers; this run takes 4, 6, 8"):
        at_size(hsdp, 5)
    link = load_config(cfg_file, ["distributed.strategy=fsdp2", "distributed.workers=4", "distributed.sync=link",
                                  "distributed.sync_groups=2", "ray.enabled=true", "ray.min_workers=2"])
    assert at_size(link, 2).distributed.sync_groups == 1
