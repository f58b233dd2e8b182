"""Sample answers along the chain: a few prompts generated greedily at each link end.

``train.sample_prompts`` are rendered as a user turn with the data's chat template (for
instruction/chat data) or used as they are (text data), and continued greedily for
``train.sample_tokens`` tokens. Every rank runs the same forwards in lockstep (a sharded
model needs all of them), always the full count (no early stop, so no rank can finish
first); the answer is then cut at the end-of-turn marker or eos. Rank 0 writes a ``samples``
record to ``metrics.jsonl`` and rewrites ``samples.md`` from all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raclora_dist.config import DataSection
from raclora_dist.data.formats import chat_template
from raclora_dist.files import write_atomic
from raclora_dist.observe.metrics import read_metrics

MARK = "\u00a7\u00a7"  # stands in for an answer, to find what the template writes after one


class Sampler:
    """Prompts rendered once; :meth:`answers` generates them with the current model."""

    def __init__(self, prompts: list[str], tokenizer, dcfg: DataSection, chat: bool, tokens: int) -> None:
        self.prompts, self.tok, self.tokens = prompts, tokenizer, tokens
        self.stops = [s for s in [tokenizer.eos_token] if s]
        if chat:
            template = chat_template(tokenizer, dcfg)

            def render(messages, gen):
                return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=gen)

            texts = [render([{"role": "user", "content": p}], True) for p in prompts]
            turn = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": MARK}], False)
            end = turn.split(MARK, 1)[1].strip()
            if end:
                self.stops.insert(0, end)
        else:
            texts = list(prompts)
        self.inputs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    @torch.no_grad()
    def answers(self, model: nn.Module, device: torch.device) -> list[str]:
        """Greedy continuations of every prompt, cut at the first stop marker."""
        out = []
        for ids in self.inputs:
            seq = torch.tensor([ids], device=device)
            for _ in range(self.tokens):
                logits = model(input_ids=seq, use_cache=False).logits[:, -1]
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            text = self.tok.decode(seq[0, len(ids):].tolist())
            for stop in self.stops:
                text = text.split(stop, 1)[0]
            out.append(text.strip())
        return out


def write_samples_md(run_dir: Path) -> None:
    """``samples.md``: each prompt's answers, link by link (from ``metrics.jsonl``)."""
    recs = [r for r in read_metrics(run_dir) if r.get("type") == "samples"]
    if not recs:
        return
    lines = ["# Sample answers along the chain", ""]
    for i, prompt in enumerate(recs[0]["prompts"]):
        lines += [f"## {prompt}", ""]
        for r in recs:
            when = "before training" if r["link"] < 0 else f"after link {r['link'] + 1}"
            lines.append(f"- {when}: `{r['answers'][i]}`")
        lines.append("")
    write_atomic(Path(run_dir) / "samples.md", "\n".join(lines))
