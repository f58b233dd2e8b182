"""Chat fine-tuning through `raclora train`, as users run it: a pretrained folder with its own
tokenizer and chat template, chat rows in a file, the loss only on the assistant's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from raclora_dist.checkpoint.folder import chain_tensors, find_latest
from raclora_dist.config import load_config
from raclora_dist.data.tokenizer import tokenizer_source
from tests.distributed.engines import losses, train
from tests.helpers import TINY_MODEL, faults, read_jsonl, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A config-built tiny Llama saved with a tokenizer that has its own chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raclora_dist.data.tokenizer import byte_tokenizer

    folder = tmp_path_factory.mktemp("pretrained") / "tiny-chat"
    cfg = dict(TINY_MODEL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(folder)
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    rows = [{"messages": [{"role": "user", "content": f"Upper: {w}{i}"}, {"role": "assistant", "content": f"{w.upper()}{i}"}]}
            for i in range(30) for w in words[i % 3: i % 3 + 2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_config(tmp, pretrained, rows):
    cfg = tiny_config(rows, tmp / "unused")
    cfg["data"].update(seq_len=64, format="chat")
    cfg["train"].update(sample_prompts=["Upper: beta3", "Upper: zeta"], sample_tokens=6)
    cfg["model"] = {"name_or_path": str(pretrained), "dtype": "float32"}
    del cfg["data"]["tokenizer"]  # the pretrained folder's own
    return write_config(tmp / "chat.yaml", cfg)


def test_tokenizer_defaults_to_the_model_folders(tmp_path, pretrained, chat_rows):
    cfg = load_config(chat_config(tmp_path, pretrained, chat_rows))
    assert cfg.data.tokenizer is None  # resolved where the run reads it, not by the config
    assert tokenizer_source(cfg) == str(pretrained)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, pretrained, chat_rows):
    tmp = tmp_path_factory.mktemp("chat-single")
    cfg = chat_config(tmp, pretrained, chat_rows)
    proc = run_cli("train", str(cfg), f"run.dir={tmp / 'run'}", env={"RACLORA_CACHE": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, tmp / "run"


def test_chat_run_trains_on_responses(single_run):
    _, single = single_run
    steps = [r for r in read_jsonl(single / "metrics.jsonl") if r["type"] == "step"]
    tokens = 4 * 64  # batch x seq_len
    assert all(0 < r["trained_tokens"] < tokens for r in steps)  # responses only
    evals = [r["eval_loss"] for r in read_jsonl(single / "metrics.jsonl") if r["type"] in ("eval", "link")]
    assert evals[-1] < evals[0]


def test_two_fsdp2_workers_tokenize_once_and_equal_one_process(tmp_path, single_run):
    cfg, single = single_run
    cache = tmp_path / "cache"
    sharded = tmp_path / "fsdp2"
    proc = train(cfg, sharded, "distributed.strategy=fsdp2", env={"RACLORA_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tokenized once (by the launching process), mapped by both workers
    assert (proc.stdout + proc.stderr).count("tokenized ") == 1
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    # masked losses normalised by the global micro-batch's response tokens: the same as one process
    assert torch.allclose(torch.tensor(losses(sharded)), torch.tensor(losses(single)), atol=1e-5)
    # sample answers generated in lockstep by both workers: those of one process
    samples = [[r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "samples"] for run in (single, sharded)]
    assert [r["link"] for r in samples[0]] == [-1, 0, 1, 2]
    assert [r["answers"] for r in samples[1]] == [r["answers"] for r in samples[0]]
    assert (sharded / "samples.md").read_text().count("after link") == 2 * 3


def test_chat_crash_and_resume_is_bitwise_equal(tmp_path, single_run):
    cfg, single = single_run
    run = tmp_path / "run"
    crashed = run_cli("train", str(cfg), f"run.dir={run}", faults(crash_at_step=5))
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    resumed = run_cli("train", str(cfg), f"run.dir={run}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = chain_tensors(find_latest(single)), chain_tensors(find_latest(run))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert losses(run) == losses(single)
    # the crashed run's samples after the checkpoint were dropped, not doubled
    assert [r["link"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "samples"] == [-1, 0, 1, 2]


def test_bad_row_stops_the_run_before_any_worker(tmp_path, pretrained):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n")
    cfg = chat_config(tmp_path, pretrained, rows)
    run = tmp_path / "run"
    proc = run_cli("train", str(cfg), f"run.dir={run}", "distributed.strategy=fsdp2", "distributed.workers=2")
    assert proc.returncode != 0
    assert f"data.path: {rows}, row 1: message 2 has role 'robot'" in proc.stderr
    assert "rank" not in proc.stderr  # the launching process said it; no worker was started
    assert not run.exists()


def test_tokenizer_larger_than_the_embedding_is_named(tmp_path, pretrained, chat_rows):
    from raclora_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(pretrained))
    tok.add_tokens([f"<extra{i}>" for i in range(5)])
    tok.save_pretrained(tmp_path / "bigger")
    cfg = chat_config(tmp_path, pretrained, chat_rows)
    proc = run_cli("train", str(cfg), f"run.dir={tmp_path / 'run'}", f"data.tokenizer={tmp_path / 'bigger'}")
    assert proc.returncode != 0
    assert (f"data.tokenizer: the tokenizer has 265 tokens, more than the model's embedding "
            f"(model.name_or_path ({pretrained}): vocab_size 260)") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_validate_reads_every_row_as_train_does(tmp_path, pretrained, chat_rows):
    """A bad second row passed `raclora validate` (exit 0) and stopped only `train`; now both
    refuse it with the same line and exit code, and a good file's rows and tokens are counted."""
    good = run_cli("validate", str(chat_config(tmp_path, pretrained, chat_rows)))
    assert good.returncode == 0, good.stderr[-2000:]
    n_rows = len(chat_rows.read_text().splitlines())
    assert f"data: {n_rows:,} rows in data.path -> training " in good.stdout
    assert "tokens with loss" in good.stdout

    rows = tmp_path / "bad.jsonl"
    first = chat_rows.read_text().splitlines()[0]
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    rows.write_text(first + "\n" + bad + "\n")
    cfg = chat_config(tmp_path, pretrained, rows)
    said = f"data.path: {rows}, row 2: message 2 has role 'robot'"
    validated = run_cli("validate", str(cfg))
    trained = run_cli("train", str(cfg), f"run.dir={tmp_path / 'run'}")
    assert validated.returncode == trained.returncode == 2
    assert said in validated.stderr and said in trained.stderr
