"""Chat fine-tuning through `raclora train`, as users run it: a pretrained folder with its own
tokenizer and chat template, chat rows in a file, the loss only on the assistant's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from raclora_dist.config import load_config
from tests.conftest import TINY_MODEL, read_jsonl, run_cli, tiny_config, write_config
from tests.distributed.test_backends import losses, train

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A config-built tiny Llama saved with a tokenizer that has its own chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raclora_dist.train.tokenizer import byte_tokenizer

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
    cfg["model"] = {"name_or_path": str(pretrained), "dtype": "float32"}
    del cfg["data"]["tokenizer"]  # the pretrained folder's own
    return write_config(tmp / "chat.yaml", cfg)


def test_tokenizer_defaults_to_the_model_folders(tmp_path, pretrained, chat_rows):
    cfg = load_config(chat_config(tmp_path, pretrained, chat_rows))
    assert cfg.data.tokenizer == str(pretrained)


def test_chat_run_on_two_fsdp2_workers_equals_one_process(tmp_path, pretrained, chat_rows):
    cfg = chat_config(tmp_path, pretrained, chat_rows)
    single = tmp_path / "single"
    proc = run_cli("train", str(cfg), f"run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_jsonl(single / "metrics.jsonl") if r["type"] == "step"]
    tokens = 4 * 64  # batch x seq_len
    assert all(0 < r["trained_tokens"] < tokens for r in steps)  # responses only
    evals = [r["eval_loss"] for r in read_jsonl(single / "metrics.jsonl") if r["type"] in ("eval", "link")]
    assert evals[-1] < evals[0]
    sharded = tmp_path / "fsdp2"
    proc = train(cfg, sharded, "distributed.strategy=fsdp2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # masked losses normalised by the global micro-batch's response tokens: the same as one process
    assert torch.allclose(torch.tensor(losses(sharded)), torch.tensor(losses(single)), atol=1e-5)


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
