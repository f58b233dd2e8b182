"""Sample answers along the chain: a few prompts generated greedily at each link end.

:class:`SampleAnswers` is the trainer's built-in callback that asks them, before the first
link of a fresh run and after every link. ``train.sample_prompts`` are rendered as a user
turn with the data's chat template (for instruction/chat data) or used as they are (text
data), and continued greedily for at most ``train.sample_tokens`` tokens by
``model.generate`` (with its KV cache). With several ranks it runs with ``synced_gpus``: a
rank whose answer ended keeps taking part in the forwards until every rank's has (a sharded
model needs all of them). The answer is cut at the end-of-turn marker or eos. Rank 0 writes a
``samples`` record to ``metrics.jsonl`` and rewrites ``samples.md`` from all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raclora_dist.config import DataSection
from raclora_dist.data.formats import chat_template
from raclora_dist.files import write_atomic
from raclora_dist.observe.metrics import read_metrics
from raclora_dist.train.callbacks import Callback

logger = logging.getLogger(__name__)

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
    def answers(self, model: nn.Module, device: torch.device, cache: bool = True) -> list[str]:
        """Greedy continuations of every prompt, cut at the first stop marker.

        Args:
            model: the causal LM (an engine's wrapper is unwrapped to the module it holds).
            device: where the prompts go.
            cache: use the KV cache (False: every step re-reads the whole sequence; the same
                answers, slower: kept for the benchmark that measures the cache).
        """
        from transformers import GenerationConfig

        lm: Any = getattr(model, "module", model)  # DDP's and DeepSpeed's wrappers hold the model (a PreTrainedModel)
        synced = dist.is_initialized() and dist.get_world_size() > 1
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        # Greedy whatever the checkpoint's generation_config.json asks (sampling, penalties).
        config = GenerationConfig(max_new_tokens=self.tokens, do_sample=False, use_cache=cache, pad_token_id=pad,
                                  eos_token_id=self.tok.eos_token_id)
        out = []
        for ids in self.inputs:
            seq = torch.tensor([ids], device=device)
            gen = lm.generate(input_ids=seq, attention_mask=torch.ones_like(seq), generation_config=config,
                              synced_gpus=synced)
            text = self.tok.decode(gen[0, len(ids):].tolist())
            for stop in self.stops:
                text = text.split(stop, 1)[0]
            out.append(text.strip())
        return out


class SampleAnswers(Callback):
    """Answers the sample prompts before the first link of a fresh run (``link`` -1) and after
    every link's boundary, on every rank in lockstep; each answer set is a ``samples`` metrics
    line, and rank 0 rewrites ``samples.md`` and logs them."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def on_train_start(self, trainer) -> None:
        if trainer.global_step == 0:  # a fresh run (a resumed one has its answers so far)
            self._answer(trainer, -1)

    def on_boundary(self, trainer, record: dict) -> None:
        self._answer(trainer, record["link"])

    def _answer(self, trainer, link: int) -> None:
        model = trainer.backend.model
        model.eval()
        answers = self.sampler.answers(model, trainer.backend.info.device)
        model.train()
        trainer.write({"type": "samples", "link": link, "step": trainer.global_step,
                       "prompts": self.sampler.prompts, "answers": answers})
        if trainer.is_main:
            write_samples_md(trainer.run_dir)
            for prompt, answer in zip(self.sampler.prompts, answers, strict=True):
                logger.info(f"  sample: {prompt!r} -> {answer!r}")


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
