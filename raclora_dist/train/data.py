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


def read_documents(dcfg: DataSection, rows=None, source: str | None = None) -> list[str]:
    """The text documents of one source: ``data.text_field`` of each row as it is, or the
    blank-line separated paragraphs of ``.txt`` files, stripped, empty ones skipped; the first
    ``max_documents``. ``rows``: the source's rows if read already; ``source``: its path
    (default: the first of ``data.path``)."""
    source = source or dcfg.paths[0]
    rows = load_rows(dcfg, source) if rows is None else rows
    field = "text" if "text" in rows.column_names and dcfg.text_field not in rows.column_names else dcfg.text_field
    if field not in rows.column_names:
        raise ConfigError(f"data.path: {source}, row 1: no field data.text_field={dcfg.text_field!r} "
                          f"(the rows have {', '.join(rows.column_names)})")
    paragraphs = rows.info.builder_name == "text"
    docs = []
    for i, value in enumerate(rows[field]):
        if value is None:
            raise ConfigError(f"data.path: {source}, row {i + 1}: field {field!r} is missing")
        if not paragraphs:
            docs.append(str(value))
        elif value.strip():
            docs.append(value.strip())
        if dcfg.max_documents and len(docs) == dcfg.max_documents:
            break
    if not docs:
        raise ConfigError(f"data.path: {source!r} holds no documents")
    return docs


def describe_data(dcfg: DataSection, data: "PackedData") -> list[str]:
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


def mix(items: list[list], weights: list[float] | None) -> list:
    """Several sources' items as one list.

    Without weights: all items, source after source. With weights: source ``i`` gives its
    first ``n_i`` items, ``n_i`` proportional to its weight, as many as the sources allow
    before the first runs out; the sources are then interleaved in a fixed pseudo-random order.
    """
    if weights is None or len(items) == 1:
        return [x for src in items for x in src]
    total = sum(weights)
    shares = [w / total for w in weights]
    scale = min(len(src) / p for src, p in zip(items, shares) if p > 0)
    counts = [int(scale * p + 1e-9) for p in shares]
    order = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))]
    taken = [0] * len(items)
    out = []
    for i in order.tolist():
        out.append(items[i][taken[i]])
        taken[i] += 1
    return out


def _source(dcfg: DataSection, tokenizer, source: str, field: str):
    """One source's format and items: text documents, or encoded examples."""
    rows = load_rows(dcfg, source, field)
    fmt = detect_format(rows.column_names, dcfg)
    try:
        if fmt == "text":
            return "text", read_documents(dcfg, rows, source)
        return fmt, encode_rows(rows, dcfg, tokenizer, fmt, f"{field}: {source}")
    except UnicodeDecodeError:  # datasets decodes strings lazily, as the rows are read
        raise ConfigError(f"{field}: {source} could not be read: not UTF-8 at {first_bad_utf8(source)}") from None


def _blocks(dcfg: DataSection, tokenizer, sources: list[str], field: str,
            weights: list[float] | None) -> dict[str, torch.Tensor]:
    read = [_source(dcfg, tokenizer, src, field) for src in sources]
    kinds = {fmt == "text" for fmt, _ in read}
    if len(kinds) > 1:
        named = ", ".join(f"{src} ({fmt})" for src, (fmt, _) in zip(sources, read))
        raise ConfigError(f"{field}: the sources mix text with instruction/chat rows ({named}); "
                          "give data of one kind, or set data.format")
    items = mix([it for _, it in read], weights)
    if kinds == {True}:
        return {"input_ids": pack(items, tokenizer, dcfg.seq_len)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack_examples(items, dcfg.seq_len, pad)


def tokenized_blocks(dcfg: DataSection, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """``data.path`` (and ``data.eval_path``) read, rendered for its format, tokenized, mixed
    and packed.

    Returns:
        ``{"train": fields}``, plus ``"eval"`` with ``data.eval_path``; each field set has
        ``input_ids`` (N, T) and, for instruction/chat data, ``labels`` and ``position_ids``.
    """
    out = {"train": _blocks(dcfg, tokenizer, dcfg.paths, "data.path", dcfg.weights)}
    if dcfg.eval_paths:
        out["eval"] = _blocks(dcfg, tokenizer, dcfg.eval_paths, "data.eval_path", None)
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
