"""Instruction and chat data through Hugging Face datasets: formats, file types, loss masks,
packing without cross-attention, and bad rows named before anything runs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from raclora_dist.config import ConfigError, DataSection
from raclora_dist.data.batches import mix, pack_examples, tokenized_blocks
from raclora_dist.data.formats import IGNORE, Example
from raclora_dist.data.tokenizer import byte_tokenizer, load_tokenizer
from tests.helpers import TINY_MODEL, captured_logs

CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Upper: abc"},
                      {"role": "assistant", "content": "ABC"}, {"role": "user", "content": "Reverse: xy"},
                      {"role": "assistant", "content": "yx"}]},
        {"messages": [{"role": "user", "content": "Count: a_b"}, {"role": "assistant", "content": "1"}]}]
ALPACA = [{"instruction": "Upper", "input": "abc", "output": "ABC"},
          {"instruction": "Say hi", "input": "", "output": "hi"}]


def write(rows: list[dict], path, kind: str):
    import datasets

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def train_blocks(dcfg, tok):
    return tokenized_blocks(dcfg, tok)["train"]


def section(path, **kw) -> DataSection:
    path = path if isinstance(path, list) else str(path)
    return DataSection(**{"path": path, "tokenizer": "bytes", "chat_template": "chatml", "seq_len": 256, **kw})


def labelled_text(tok, ids, labels) -> list[str]:
    """The labelled runs of tokens, decoded (one string per contiguous run)."""
    runs, cur = [], []
    for i, label in zip(ids, labels, strict=False):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_chat_rows_label_only_assistant_turns(tmp_path, kind):
    path = write(CHAT, tmp_path / f"chat.{ 'x' if kind == 'disk' else kind}", kind)
    tok = byte_tokenizer()
    out = train_blocks(section(path, seq_len=320), tok)
    ids, labels, pos = out["input_ids"][0].tolist(), out["labels"][0].tolist(), out["position_ids"][0].tolist()
    # the two conversations share one block; only the assistants' turns (with the end of turn) carry loss
    assert labelled_text(tok, ids, labels) == ["ABC<|im_end|>\n", "yx<|im_end|>\n", "1<|im_end|>\n"]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nUpper: abc")
    second = text.index("<|im_start|>user\nCount")
    assert pos[second] == 0 and pos[second - 1] > 0  # positions restart at the second example
    assert pos[:5] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_instruction_rows(tmp_path, kind):
    path = write(ALPACA, tmp_path / f"alpaca.{kind}", kind)
    tok = byte_tokenizer()
    out = train_blocks(section(path), tok)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert labelled_text(tok, ids, labels) == ["ABC<|im_end|>\n", "hi<|im_end|>\n"]
    assert "<|im_start|>user\nUpper\n\nabc<|im_end|>" in tok.decode(ids)  # input follows a blank line
    assert "<|im_start|>user\nSay hi<|im_end|>" in tok.decode(ids)  # an empty input is left out
    every = train_blocks(section(path, train_on_prompt=True), tok)
    real = every["input_ids"][0] != tok.pad_token_id
    assert torch.equal(every["labels"][0][real], every["input_ids"][0][real])


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_text_rows_keep_todays_packing(tmp_path, kind):
    docs = ["first document " * 3, "second one " * 4, "third"]
    if kind == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(docs) + "\n")
        docs = [d.strip() for d in docs]
    else:
        path = write([{"text": d} for d in docs], tmp_path / f"d.{kind}", kind)
    tok = byte_tokenizer()
    out = train_blocks(DataSection(path=str(path), seq_len=16), tok)
    assert set(out) == {"input_ids"}  # loss on every token, no restart
    want = []
    for d in docs:
        want += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(want) // 16
    assert out["input_ids"].flatten().tolist() == want[: n * 16]


def test_tokenizer_with_its_own_template_and_special_tokens(tmp_path):
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    path = write(CHAT[1:], tmp_path / "c.jsonl", "jsonl")
    out = train_blocks(DataSection(path=str(path), tokenizer=str(tmp_path / "tok"), seq_len=64), loaded)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    end, user, assistant = (loaded.convert_tokens_to_ids(t) for t in ("<|end|>", "<|user|>", "<|assistant|>"))
    assert ids[0] == user and ids.count(end) == 2 and assistant in ids  # special tokens as single ids
    labelled = [i for i, lab in zip(ids, labels, strict=False) if lab != IGNORE]
    assert labelled == [ord("1"), end]  # the response and its end-of-turn token, nothing else
    assert ids[ids.index(assistant) + 1] == ord("1") and labels[ids.index(assistant)] == IGNORE


def test_packed_examples_do_not_attend_to_each_other():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    a, b, c = Example([5, 6, 7, 8], [5, 6, 7, 8]), Example([9, 10, 11], [9, 10, 11]), Example([12, 13], [12, 13])
    packed = pack_examples([a, b, c], 12, pad_id=0)
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]

    def logits(block):
        with torch.no_grad():
            return model(input_ids=block["input_ids"], position_ids=block["position_ids"], use_cache=False).logits[0]

    perturbed = pack_examples([a, Example([40, 41, 42], [40, 41, 42]), c], 12, pad_id=0)
    x, y = logits(packed), logits(perturbed)
    assert torch.equal(x[:4], y[:4])  # before the change: causal anyway
    assert torch.allclose(x[7:9], y[7:9], atol=1e-6)  # after it: only a block-diagonal mask keeps these
    assert not torch.allclose(x[4:7], y[4:7])
    # the same three examples run one by one give the packed logits
    alone = model(input_ids=torch.tensor([c.ids]), use_cache=False).logits[0]
    assert torch.allclose(alone, x[7:9], atol=1e-5)


BAD = {
    "missing field": ([{"instruction": "x"}], "alpaca", "row 1: field 'output' is missing"),
    "empty response": ([ALPACA[0], {"instruction": "x", "output": "  "}], "alpaca",
                       r"row 2: field 'output' \(the response\) is empty"),
    "wrong role": ([{"messages": [{"role": "robot", "content": "hi"}]}], "chat", "row 1: message 1 has role 'robot'"),
    "no assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], "chat", "row 1: the conversation has no assistant"),
    "empty assistant": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
                        "chat", r"row 1: an assistant message \(a response\) is empty"),
    "too long": ([{"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}],
                 "chat", "row 1: .* tokens, longer than data.seq_len=256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_are_named(tmp_path, case):
    rows, fmt, message = BAD[case]
    path = write(rows, tmp_path / "bad.jsonl", "jsonl")
    with pytest.raises(ConfigError, match=re.escape(f"data.path: {path}, ") + message):
        train_blocks(section(path, format="instruction" if fmt == "alpaca" else "chat"), byte_tokenizer())


def test_num_proc_encodes_the_same_blocks_and_names_a_bad_row_in_a_worker(tmp_path):
    rows = [CHAT[i % 2] for i in range(700)]  # several map chunks, split over 2 processes
    path = write(rows, tmp_path / "c.jsonl", "jsonl")
    tok = byte_tokenizer()
    one, two = (train_blocks(section(path, num_proc=n), tok) for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    bad = write([*rows[:600], {"messages": [{"role": "robot", "content": "hi"}]}], tmp_path / "bad.jsonl", "jsonl")
    with pytest.raises(ConfigError, match=re.escape(f"data.path: {bad}, row 601: message 1 has role 'robot'")):
        train_blocks(section(bad, num_proc=2), tok)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    with pytest.raises(ConfigError, match=re.escape(f"data.path: {path} could not be read: not UTF-8 at {path}, line 1")):
        train_blocks(section(path), byte_tokenizer())


def test_overlong_rule_drop_and_truncate(tmp_path):
    rows = [CHAT[1], {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}]
    path = write(rows, tmp_path / "c.jsonl", "jsonl")
    tok = byte_tokenizer()
    dropped = train_blocks(section(path, overlong="drop"), tok)
    assert labelled_text(tok, dropped["input_ids"][0].tolist(), dropped["labels"][0].tolist()) == ["1<|im_end|>\n"]
    cut = train_blocks(section(path, overlong="truncate"), tok)  # its response was cut away: skipped
    assert torch.equal(cut["labels"], dropped["labels"])


def test_sources_mixed_by_weight(tmp_path):
    a = write([{"messages": [{"role": "user", "content": f"a{i}"}, {"role": "assistant", "content": "A"}]}
               for i in range(30)], tmp_path / "a.jsonl", "jsonl")
    b = write([{"instruction": f"b{i}", "output": "B"} for i in range(40)], tmp_path / "b.parquet", "parquet")
    tok = byte_tokenizer()
    both = train_blocks(section([str(a), str(b)], seq_len=80), tok)  # chat + instruction: one kind
    answers = [t for row in labelled_runs(tok, both) for t in row]
    assert answers.count("A<|im_end|>\n") == 30 and answers.count("B<|im_end|>\n") == 40
    mixed = train_blocks(section([str(a), str(b)], seq_len=80, weights=[1, 3]), tok)
    answers = [t for row in labelled_runs(tok, mixed) for t in row]
    # 1:3 until a source runs out: b's 40 rows allow 13 of a's
    assert answers.count("A<|im_end|>\n") == 13 and answers.count("B<|im_end|>\n") == 40
    assert mix([[1, 2, 3], ["x", "y", "z", "w"]], [1, 1]) != [1, 2, 3, "x", "y", "z"]  # interleaved
    text = write([{"text": "plain"}], tmp_path / "t.jsonl", "jsonl")
    with pytest.raises(ConfigError, match="the sources mix text with instruction/chat rows"):
        train_blocks(section([str(a), str(text)]), tok)
    with pytest.raises(ValueError, match=r"data.weights: \[1.0\] must be 2 non-negative numbers"):
        section([str(a), str(b)], weights=[1])


def labelled_runs(tok, blocks):
    return [labelled_text(tok, i.tolist(), lab.tolist()) for i, lab in zip(blocks["input_ids"], blocks["labels"], strict=False)]


def test_eval_path_is_held_out_as_given(tmp_path):
    from raclora_dist.data.batches import PackedData

    train = write(CHAT * 4, tmp_path / "train.jsonl", "jsonl")
    held = write([CHAT[1]], tmp_path / "eval.jsonl", "jsonl")
    tok = byte_tokenizer()
    sets = tokenized_blocks(section(train, eval_path=str(held)), tok)
    data = PackedData(sets["train"], 0.3, 2, 0, eval_blocks=sets["eval"])
    assert len(data.train) == len(sets["train"]["input_ids"])  # eval_fraction not taken from training
    (batch,) = data.eval_inputs(4)
    assert labelled_runs(tok, batch) == [["1<|im_end|>\n"]]


def test_tokenized_cache_is_built_once_and_memory_mapped(tmp_path):
    from raclora_dist.data.batches import write_blocks
    from raclora_dist.data.token_cache import cache_key, cached_blocks

    path = write(CHAT * 3, tmp_path / "c.jsonl", "jsonl")
    dcfg = section(path, cache_dir=str(tmp_path / "cache"))
    tok = byte_tokenizer()
    built = tokenized_blocks(dcfg, tok)
    with captured_logs() as lines:
        first = cached_blocks(dcfg, tok, lambda folder: write_blocks(dcfg, tok, folder))
    assert len(lines) == 1 and "tokenized" in lines[0]
    assert not [p for p in (tmp_path / "cache").rglob(".items-*")], "the streamed build left its item files"

    def must_not_build(folder):
        raise AssertionError("tokenized again")

    with captured_logs() as lines:
        again = cached_blocks(dcfg, tok, must_not_build)
    assert not lines
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for k, v in built["train"].items():
        assert torch.equal(first["train"][k].long(), v) and torch.equal(again["train"][k].long(), v)
    key = cache_key(dcfg, tok)
    assert cache_key(section(path, cache_dir=str(tmp_path / "cache"), train_on_prompt=True), tok) != key
    path.write_text(path.read_text() + json.dumps(CHAT[1]) + "\n")  # the data changed: a new entry
    assert cache_key(dcfg, tok) != key


def test_sampler_renders_a_user_turn_and_cuts_at_the_end_of_turn():
    from raclora_dist.train.samples import Sampler

    tok = byte_tokenizer()
    sampler = Sampler(["Upper: ab"], tok, section("unused.jsonl"), chat=True, tokens=4)
    assert tok.decode(sampler.inputs[0]) == "<|im_start|>user\nUpper: ab<|im_end|>\n<|im_start|>assistant\n"
    assert sampler.stops[0] == "<|im_end|>"

    class Echo(torch.nn.Module):  # a "model" whose answer spells "AB<|im_end|>xyz"
        def generate(self, input_ids, **kwargs):
            answer = torch.tensor([[ord(c) for c in "AB<|im_end|>xyz"]])
            return torch.cat([input_ids, answer[:, : kwargs["generation_config"].max_new_tokens]], dim=1)

    sampler.tokens = 14
    assert sampler.answers(Echo(), torch.device("cpu")) == ["AB"]
    plain = Sampler(["def f"], tok, section("unused.jsonl"), chat=False, tokens=4)
    assert tok.decode(plain.inputs[0]) == "def f" and plain.stops == [tok.eos_token]


def test_sampler_answers_are_the_greedy_tokens_with_and_without_the_kv_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    from raclora_dist.train.samples import Sampler

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)).eval()
    sampler = Sampler(["def f", "import o"], tok, section("unused.jsonl"), chat=False, tokens=12)
    expected = []
    for ids in sampler.inputs:  # greedy by hand: the whole sequence through the model per token
        seq = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected.append(tok.decode(seq[0, len(ids):].tolist()).split(tok.eos_token, 1)[0].strip())
    assert any(expected)  # a random model still says something
    assert sampler.answers(model, torch.device("cpu")) == expected
    assert sampler.answers(model, torch.device("cpu"), cache=False) == expected
