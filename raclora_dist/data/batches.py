"""Training data: rows -> token blocks of ``seq_len`` -> batches that are a pure function of the step.

``text`` documents are packed across document boundaries (each followed by eos) with the
loss on every token. ``instruction``/``chat`` examples (:mod:`raclora_dist.data.formats`)
are packed whole, first fit in order, with position ids restarting at each example, so that
transformers' attention (its packed-sequence mask, found from the position ids) never lets
one example see another; the rest of a block is padding without loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raclora_dist.config import ConfigError, DataSection
from raclora_dist.data.formats import IGNORE, Example, detect_format
from raclora_dist.data.packing import (
    ExamplePacker,
    ItemStore,
    iter_documents,
    mix_order,
    scratch,
    store_documents,
    store_examples,
    write_part,
)
from raclora_dist.data.rows import first_bad_utf8, load_rows


def read_documents(dcfg: DataSection, rows=None, source: str | None = None) -> list[str]:
    """The text documents of one source, in memory (see
    :func:`raclora_dist.data.packing.store_documents` for what counts as one); ``rows``: the
    source's rows if read already; ``source``: its path (default: the first of ``data.path``)."""
    source = source or dcfg.paths[0]
    rows = load_rows(dcfg, source) if rows is None else rows
    field = "text" if "text" in rows.column_names and dcfg.text_field not in rows.column_names else dcfg.text_field
    if field not in rows.column_names:
        raise ConfigError(f"data.path: {source}, row 1: no field data.text_field={dcfg.text_field!r} "
                          f"(the rows have {', '.join(rows.column_names)})")
    docs = [d for chunk in iter_documents(dcfg, rows, source, field) for d in chunk]
    if not docs:
        raise ConfigError(f"data.path: {source!r} holds no documents")
    return docs


def describe_data(dcfg: DataSection, data: PackedData) -> list[str]:
    """What ``raclora validate`` says about the data: rows read per source kind, and the
    sequences and tokens they became (those with loss, for instruction/chat data)."""
    def rows(sources: list[str], field: str) -> int:
        n = sum(len(load_rows(dcfg, s, field)) for s in sources)
        return min(n, dcfg.max_documents * len(sources)) if dcfg.max_documents else n

    def tokens(fields: dict[str, torch.Tensor]) -> str:
        ids = fields["input_ids"]
        if "labels" in fields:
            with_loss = int((fields["labels"][:, 1:] != IGNORE).sum())
            return f"{len(ids):,} sequences of {ids.shape[1]} tokens ({with_loss:,} tokens with loss)"
        return f"{len(ids):,} sequences of {ids.shape[1]} tokens ({ids.numel():,} tokens)"

    lines = [f"data: {rows(dcfg.paths, 'data.path'):,} rows in data.path -> training {tokens(data.fields)}"]
    if dcfg.eval_paths:
        lines.append(f"eval: {rows(dcfg.eval_paths, 'data.eval_path'):,} rows in data.eval_path -> "
                     f"{tokens(data.eval_fields)}")
    else:
        lines.append(f"eval: the last {dcfg.eval_fraction:.0%} of the sequences -> {tokens(data.eval_fields)}")
    return lines


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Whole examples into (N, seq_len) blocks, first fit in order (each example <= seq_len),
    in memory (:class:`raclora_dist.data.packing.ExamplePacker`).

    Returns:
        ``input_ids``, ``labels`` (-100 on prompt and padding) and ``position_ids`` (0 at each
        example's first token; padding counts on from the last example), each (N, seq_len).
    """
    packer = ExamplePacker(seq_len, pad_id)
    blocks = [b for ex in examples for b in packer.add(ex.ids, ex.labels)] + list(packer.finish())
    t = [torch.tensor(col, dtype=torch.long) for col in zip(*blocks, strict=False)]
    return {"input_ids": t[0], "labels": t[1], "position_ids": t[2]}


def mix(items: list[list], weights: list[float] | None) -> list:
    """Several sources' items as one list, in :func:`raclora_dist.data.packing.mix_order`."""
    return [items[s][i] for s, i in mix_order([len(src) for src in items], weights)]


def write_blocks(dcfg: DataSection, tokenizer, folder: Path) -> dict[str, list[int]]:
    """``data.path`` (and ``data.eval_path``) read, rendered for its format, tokenized, mixed
    and packed into ``folder/<part>.<field>.bin`` in a stream (:mod:`raclora_dist.data.packing`):
    memory is bounded by a chunk of rows, not by the corpus.

    Returns:
        ``{"train.input_ids": [N, T], ...}``: ``train`` (and ``eval`` with ``data.eval_path``)
        parts of ``input_ids`` and, for instruction/chat data, ``labels`` and ``position_ids``.
    """
    shapes = _write_part(dcfg, tokenizer, dcfg.paths, "data.path", dcfg.weights, folder, "train")
    if dcfg.eval_paths:
        shapes.update(_write_part(dcfg, tokenizer, dcfg.eval_paths, "data.eval_path", None, folder, "eval"))
    return shapes


def _write_part(dcfg: DataSection, tokenizer, sources: list[str], field: str, weights: list[float] | None,
                folder: Path, part: str) -> dict[str, list[int]]:
    opened = []
    for src in sources:
        rows = load_rows(dcfg, src, field)
        opened.append((src, rows, detect_format(rows.column_names, dcfg)))
    kinds = {fmt == "text" for _, _, fmt in opened}
    if len(kinds) > 1:
        named = ", ".join(f"{src} ({fmt})" for src, _, fmt in opened)
        raise ConfigError(f"{field}: the sources mix text with instruction/chat rows ({named}); "
                          "give data of one kind, or set data.format")
    text = kinds == {True}
    with scratch(folder) as tmp:
        stores = []
        for k, (src, rows, fmt) in enumerate(opened):
            store = ItemStore(Path(tmp) / str(k), labelled=not text)
            try:
                if text:
                    store_documents(dcfg, rows, src, tokenizer, store)
                else:
                    store_examples(dcfg, rows, tokenizer, fmt, f"{field}: {src}", store)
            except UnicodeDecodeError:  # datasets decodes strings lazily, as the rows are read
                raise ConfigError(f"{field}: {src} could not be read: not UTF-8 at {first_bad_utf8(src)}") from None
            store.close()
            stores.append(store)
        return write_part(dcfg, tokenizer, stores, weights, text, folder, part)


def tokenized_blocks(dcfg: DataSection, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`write_blocks` read back into memory (int64 tensors): ``{"train": fields}``, plus
    ``"eval"`` with ``data.eval_path``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raclora-blocks-") as tmp:
        shapes = write_blocks(dcfg, tokenizer, Path(tmp))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, shape in shapes.items():
            part, name = key.split(".", 1)
            flat = np.fromfile(Path(tmp) / f"{key}.bin", dtype=np.int32)
            out.setdefault(part, {})[name] = torch.from_numpy(flat).long().view(*shape)
        return out


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
        blocks: (N, seq_len) token ids, or a field set of :func:`tokenized_blocks`
            (``input_ids`` and optionally ``labels`` and ``position_ids``, each (N, seq_len);
            integer tensors, memory-mapped int32 ones too).
        eval_fraction: share of blocks (the last ones) held out for evaluation, unless
            ``eval_blocks`` (a field set from ``data.eval_path``) are given.
        batch_size: sequences per micro-batch. seed: the shuffling seed.
    """

    def __init__(self, blocks: torch.Tensor | dict[str, torch.Tensor], eval_fraction: float, batch_size: int,
                 seed: int, eval_blocks: dict[str, torch.Tensor] | None = None) -> None:
        fields = blocks if isinstance(blocks, dict) else {"input_ids": blocks}
        ids = fields["input_ids"]
        n_eval = 0 if eval_blocks is not None else int(len(ids) * eval_fraction)
        if len(ids) - n_eval < batch_size:
            raise ConfigError(
                f"data: only {len(ids) - n_eval} training sequences of length "
                f"{ids.shape[1]}, fewer than train.batch_size={batch_size}"
            )
        cut = len(ids) - n_eval
        self.fields = {k: v[:cut] for k, v in fields.items()}
        self.eval_fields = eval_blocks if eval_blocks is not None else {k: v[cut:] for k, v in fields.items()}
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
        return self.train[self._rows(micro_index)].long()

    def train_inputs(self, micro_index: int) -> dict[str, torch.Tensor]:
        """The ``micro_index``-th micro-batch with all its fields, each (batch_size, seq_len)."""
        rows = self._rows(micro_index)
        return {k: v[rows].long() for k, v in self.fields.items()}  # int32 when memory-mapped

    def eval_batches(self, count: int) -> list[torch.Tensor]:
        """Up to ``count`` fixed eval micro-batches of token ids."""
        return [b.long() for b in self.eval.split(self.batch_size)][:count]

    def eval_inputs(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``count`` fixed eval micro-batches with all their fields."""
        split = {k: v.split(self.batch_size)[:count] for k, v in self.eval_fields.items()}
        return [{k: split[k][i].long() for k in split} for i in range(len(split["input_ids"]))]
