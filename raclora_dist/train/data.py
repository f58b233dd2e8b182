"""Text/JSONL data from disk: tokenize, pack to a sequence length, deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raclora_dist.config import ConfigError, DataSection


def read_documents(dcfg: DataSection) -> list[str]:
    """Reads documents: JSONL (one object per line, ``text_field``) or text (blank-line split)."""
    path = Path(dcfg.path)
    if not path.is_file():
        raise ConfigError(f"data.path: file {dcfg.path!r} does not exist")
    fmt = dcfg.format if dcfg.format != "auto" else ("jsonl" if path.suffix in (".jsonl", ".json") else "text")
    docs: list[str] = []
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)[dcfg.text_field]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(
                        f"data.path: {dcfg.path}:{i} is not a JSON object with field "
                        f"data.text_field={dcfg.text_field!r} ({err})"
                    ) from None
    else:
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if dcfg.max_documents:
        docs = docs[: dcfg.max_documents]
    if not docs:
        raise ConfigError(f"data.path: {dcfg.path!r} holds no documents")
    return docs


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenates tokenized documents (each followed by eos) into (N, seq_len) blocks.

    The tail that does not fill a block is dropped.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class PackedData:
    """Packed blocks split into train/eval, with batches that are a pure function of the step.

    The data position is therefore just the global step: a resumed run draws exactly the
    batches the uninterrupted run would have drawn.

    Args:
        blocks: (N, seq_len) token ids.
        eval_fraction: share of blocks (the last ones) held out for evaluation.
        batch_size: sequences per micro-batch. seed: the shuffling seed.
    """

    def __init__(self, blocks: torch.Tensor, eval_fraction: float, batch_size: int, seed: int) -> None:
        n_eval = int(len(blocks) * eval_fraction)
        if len(blocks) - n_eval < batch_size:
            raise ConfigError(
                f"data: only {len(blocks) - n_eval} training sequences of length "
                f"{blocks.shape[1]}, fewer than train.batch_size={batch_size}"
            )
        self.train, self.eval = blocks[: len(blocks) - n_eval], blocks[len(blocks) - n_eval :]
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train), generator=gen)}
        return self._perms[epoch]

    def train_batch(self, micro_index: int) -> torch.Tensor:
        """The ``micro_index``-th micro-batch of the run, shape (batch_size, seq_len)."""
        n = len(self.train)
        start = micro_index * self.batch_size
        rows = []
        for i in range(start, start + self.batch_size):
            rows.append(self._perm(i // n)[i % n])
        return self.train[torch.stack(rows)]

    def eval_batches(self, count: int) -> list[torch.Tensor]:
        """Up to ``count`` fixed eval micro-batches."""
        return [b for b in self.eval.split(self.batch_size)][:count]
