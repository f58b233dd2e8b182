"""Training data: rows -> token blocks of ``seq_len`` -> batches that are a pure function of the step.

``text`` documents are packed across document boundaries (each followed by eos) with the
loss on every token. ``instruction``/``chat`` examples (:mod:`raclora_dist.train.formats`)
are packed whole, first fit in order, with position ids restarting at each example, so that
transformers' attention (its packed-sequence mask, found from the position ids) never lets
one example see another; the rest of a block is padding without loss.
"""

from __future__ import annotations

import torch

from raclora_dist.config import ConfigError, DataSection
from raclora_dist.train.formats import IGNORE, Example, detect_format, encode_rows
from raclora_dist.train.records import first_bad_utf8, load_rows


def read_documents(dcfg: DataSection, rows=None) -> list[str]:
    """The text documents of ``data.path``: ``data.text_field`` of each row as it is, or the
    blank-line separated paragraphs of ``.txt`` files, stripped, empty ones skipped; the first
    ``max_documents``."""
    rows = load_rows(dcfg) if rows is None else rows
    field = "text" if "text" in rows.column_names and dcfg.text_field not in rows.column_names else dcfg.text_field
    if field not in rows.column_names:
        raise ConfigError(f"data.path: {dcfg.path}, row 1: no field data.text_field={dcfg.text_field!r} "
                          f"(the rows have {', '.join(rows.column_names)})")
    paragraphs = rows.info.builder_name == "text"
    docs = []
    for i, value in enumerate(rows[field]):
        if value is None:
            raise ConfigError(f"data.path: {dcfg.path}, row {i + 1}: field {field!r} is missing")
        if not paragraphs:
            docs.append(str(value))
        elif value.strip():
            docs.append(value.strip())
        if dcfg.max_documents and len(docs) == dcfg.max_documents:
            break
    if not docs:
        raise ConfigError(f"data.path: {dcfg.path!r} holds no documents")
    return docs


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Whole examples into (N, seq_len) blocks, first fit in order (each example <= seq_len).

    Returns:
        ``input_ids``, ``labels`` (-100 on prompt and padding) and ``position_ids`` (0 at each
        example's first token; padding counts on from the last example), each (N, seq_len).
    """
    blocks: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def close() -> None:
        pad = seq_len - len(ids)
        start = pos[-1] + 1 if pos else 0
        blocks.append((ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(start, start + pad))))

    for ex in examples:
        if len(ids) + len(ex.ids) > seq_len:
            close()
            ids, labels, pos = [], [], []
        ids, labels, pos = ids + ex.ids, labels + ex.labels, pos + list(range(len(ex.ids)))
    if ids:
        close()
    t = [torch.tensor(col, dtype=torch.long) for col in zip(*blocks)]
    return {"input_ids": t[0], "labels": t[1], "position_ids": t[2]}


def tokenized_blocks(dcfg: DataSection, tokenizer) -> dict[str, torch.Tensor]:
    """``data.path`` read, rendered for its format, tokenized and packed: ``input_ids`` (N, T),
    and for instruction/chat data ``labels`` and ``position_ids`` (N, T)."""
    rows = load_rows(dcfg)
    fmt = detect_format(rows.column_names, dcfg)
    try:
        if fmt == "text":
            return {"input_ids": pack(read_documents(dcfg, rows), tokenizer, dcfg.seq_len)}
        examples = encode_rows(rows, dcfg, tokenizer, fmt)
    except UnicodeDecodeError:  # datasets decodes strings lazily, as the rows are read
        raise ConfigError(f"data.path: {dcfg.path} could not be read: not UTF-8 at {first_bad_utf8(dcfg)}") from None
    return pack_examples(examples, dcfg.seq_len, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)


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
        blocks: (N, seq_len) token ids, or the fields of :func:`tokenized_blocks`
            (``input_ids`` and optionally ``labels`` and ``position_ids``, each (N, seq_len)).
        eval_fraction: share of blocks (the last ones) held out for evaluation.
        batch_size: sequences per micro-batch. seed: the shuffling seed.
    """

    def __init__(self, blocks: torch.Tensor | dict[str, torch.Tensor], eval_fraction: float, batch_size: int,
                 seed: int) -> None:
        fields = blocks if isinstance(blocks, dict) else {"input_ids": blocks}
        ids = fields["input_ids"]
        n_eval = int(len(ids) * eval_fraction)
        if len(ids) - n_eval < batch_size:
            raise ConfigError(
                f"data: only {len(ids) - n_eval} training sequences of length "
                f"{ids.shape[1]}, fewer than train.batch_size={batch_size}"
            )
        cut = len(ids) - n_eval
        self.fields = {k: v[:cut] for k, v in fields.items()}
        self.eval_fields = {k: v[cut:] for k, v in fields.items()}
        self.train, self.eval = self.fields["input_ids"], self.eval_fields["input_ids"]
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def masked(self) -> bool:
        """Whether the blocks carry their own labels (instruction/chat data)."""
        return "labels" in self.fields

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train), generator=gen)}
        return self._perms[epoch]

    def _rows(self, micro_index: int) -> torch.Tensor:
        n = len(self.train)
        start = micro_index * self.batch_size
        return torch.stack([self._perm(i // n)[i % n] for i in range(start, start + self.batch_size)])

    def train_batch(self, micro_index: int) -> torch.Tensor:
        """The ``micro_index``-th micro-batch of the run's token ids, shape (batch_size, seq_len)."""
        return self.train[self._rows(micro_index)]

    def train_inputs(self, micro_index: int) -> dict[str, torch.Tensor]:
        """The ``micro_index``-th micro-batch with all its fields, each (batch_size, seq_len)."""
        rows = self._rows(micro_index)
        return {k: v[rows] for k, v in self.fields.items()}

    def eval_batches(self, count: int) -> list[torch.Tensor]:
        """Up to ``count`` fixed eval micro-batches of token ids."""
        return [b for b in self.eval.split(self.batch_size)][:count]

    def eval_inputs(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``count`` fixed eval micro-batches with all their fields."""
        split = {k: v.split(self.batch_size)[:count] for k, v in self.eval_fields.items()}
        return [{k: split[k][i] for k in split} for i in range(len(split["input_ids"]))]
