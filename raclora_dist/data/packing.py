"""Rows -> token blocks on disk, in a stream: memory bounded by a chunk of rows, not by the corpus.

Two passes over each source, both streamed:

1. **Encode** (:class:`ItemStore`): rows are read ``CHUNK_ROWS`` at a time (``Dataset.iter``:
   the rows stay in datasets' memory-mapped Arrow files), rendered, and tokenized a chunk at a
   time: text by a fast tokenizer's batch call (which runs on every core), instruction/chat
   rows by ``datasets.map`` (their templates render in Python: ``data.num_proc`` processes).
   Each item (a text document with its eos, or an instruction/chat example with its labels)
   is appended to int32 files in a temporary folder, with its end offset.
2. **Mix and pack**: the items of all sources, in :func:`mix_order` (all of each source in
   turn, or interleaved by ``data.weights``), read back sequentially and packed: text is
   concatenated and cut every ``seq_len`` tokens (the tail dropped); examples are packed
   whole, first fit in order, padded without loss (:class:`ExamplePacker`). Blocks are
   appended to ``<part>.<field>.bin`` (int32, row-major (N, seq_len)) every
   ``FLUSH_TOKENS`` tokens.

The blocks are exactly those of packing everything in memory (tested against it); what
differs is that no step holds more than a chunk of rows, a flush of blocks, or the mixing
order (2 bytes per item).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from raclora_dist.config import ConfigError, DataSection
from raclora_dist.data.formats import IGNORE, ChatEncoder, Example, chat_messages, instruction_messages, row_where

CHUNK_ROWS = 256  # rows read, rendered and tokenized at a time (a fast tokenizer holds ~100 bytes a token)
READ_ITEMS = 4096  # items read back at a time
FLUSH_TOKENS = 1 << 22  # tokens of blocks held before they are appended to their files (16 MiB a field)


def mix_order(counts: list[int], weights: list[float] | None) -> Iterator[tuple[int, int]]:
    """``(source, index)`` of every item taken, in order (lazily: 2 bytes per item at most).

    Without weights: all items, source after source. With weights: source ``i`` gives its
    first ``n_i`` items, ``n_i`` proportional to its weight, as many as the sources allow
    before the first runs out; the sources are then interleaved in a fixed pseudo-random order.
    """
    if weights is None or len(counts) == 1:
        yield from ((s, i) for s, n in enumerate(counts) for i in range(n))
        return
    total = sum(weights)
    shares = [w / total for w in weights]
    scale = min(n / p for n, p in zip(counts, shares, strict=False) if p > 0)
    taken = [int(scale * p + 1e-9) for p in shares]
    order = torch.cat([torch.full((n,), i, dtype=torch.int16) for i, n in enumerate(taken)])
    order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))]
    nxt = [0] * len(counts)
    for chunk in order.split(1 << 16):
        for s in chunk.tolist():
            yield s, nxt[s]
            nxt[s] += 1


# -- pass 1: items on disk -----------------------------------------------------------------------
class ItemStore:
    """One source's items, appended to int32 files in ``folder`` (ids, labels if any) with
    their end offsets; read back memory-mapped."""

    def __init__(self, folder: Path, labelled: bool) -> None:
        folder.mkdir(parents=True)
        self.folder, self.labelled = folder, labelled
        self._files = {"ids": (folder / "ids.bin").open("wb"), "ends": (folder / "ends.bin").open("wb")}
        if labelled:
            self._files["labels"] = (folder / "labels.bin").open("wb")
        self.count = self._end = 0

    def add(self, items: list[tuple[list[int], list[int] | None]]) -> None:
        """Appends items (ids, labels or None); one write per file per call."""
        if not items:
            return
        ends = np.cumsum([len(ids) for ids, _ in items], dtype=np.int64) + self._end
        np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in items]).tofile(self._files["ids"])
        if self.labelled:
            np.concatenate([np.asarray(labels, dtype=np.int32) for _, labels in items]).tofile(self._files["labels"])
        ends.tofile(self._files["ends"])
        self.count += len(items)
        self._end = int(ends[-1])

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def items(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The items in order, read sequentially ``READ_TOKENS`` at a time (plain reads, not a
        memory map: what was read is not held)."""
        if not self.count:
            return
        with (self.folder / "ids.bin").open("rb") as ids_f, (self.folder / "ends.bin").open("rb") as ends_f, \
                ((self.folder / "labels.bin").open("rb") if self.labelled else open(os.devnull, "rb")) as lab_f:
            ids, labels, base = np.zeros(0, np.int32), np.zeros(0, np.int32), 0
            while True:
                ends = np.fromfile(ends_f, dtype=np.int64, count=READ_ITEMS)
                if not len(ends):
                    return
                need = int(ends[-1]) - base
                ids = np.fromfile(ids_f, dtype=np.int32, count=need)
                if self.labelled:
                    labels = np.fromfile(lab_f, dtype=np.int32, count=need)
                start = 0
                for end in (ends - base).tolist():
                    yield ids[start:end], (labels[start:end] if self.labelled else None)
                    start = end
                base = int(ends[-1])


def store_documents(dcfg: DataSection, rows, source: str, tokenizer, store: ItemStore) -> None:
    """Text rows: ``data.text_field`` of each row as it is, or the blank-line separated
    paragraphs of ``.txt`` files, stripped, empty ones skipped; the first ``max_documents``;
    each tokenized and followed by eos.

    Raises:
        ConfigError: the field is missing (naming the row), or the source holds no documents.
    """
    field = "text" if "text" in rows.column_names and dcfg.text_field not in rows.column_names else dcfg.text_field
    if field not in rows.column_names:
        raise ConfigError(f"data.path: {source}, row 1: no field data.text_field={dcfg.text_field!r} "
                          f"(the rows have {', '.join(rows.column_names)})")
    eos = tokenizer.eos_token_id
    for docs in iter_documents(dcfg, rows, source, field):
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        store.add([([*list(ids), eos], None) for ids in encoded])
    if store.count == 0:
        raise ConfigError(f"data.path: {source!r} holds no documents")


def iter_documents(dcfg: DataSection, rows, source: str, field: str) -> Iterator[list[str]]:
    """The documents of ``rows`` in chunks (see :func:`store_documents`)."""
    paragraphs = rows.info.builder_name == "text"
    taken = row = 0
    for batch in rows.iter(batch_size=CHUNK_ROWS):
        docs = []
        for value in batch[field]:
            if value is None:
                raise ConfigError(f"data.path: {source}, row {row + 1}: field {field!r} is missing")
            row += 1
            if not paragraphs:
                docs.append(str(value))
            elif value.strip():
                docs.append(value.strip())
            else:
                continue
            taken += 1
            if dcfg.max_documents and taken == dcfg.max_documents:
                break
        if docs:
            yield docs
        if dcfg.max_documents and taken == dcfg.max_documents:
            return


def store_examples(dcfg: DataSection, rows, tokenizer, fmt: str, source: str, store: ItemStore) -> None:
    """Instruction or chat rows as examples (the first ``max_documents`` rows), each checked.

    The rows are rendered and tokenized by ``datasets.map`` (``data.num_proc`` processes, each
    a contiguous range of rows), into an Arrow file in the store's folder: the examples stay
    on disk and are read back a chunk at a time, in row order.

    Raises:
        ConfigError: naming file, row and field: a missing or empty field, an unknown role,
            no assistant turn, or (``data.overlong: error``) an example longer than seq_len; or
            no example fits.
    """
    from datasets import Features, Sequence, Value

    limit = len(rows) if dcfg.max_documents is None else min(dcfg.max_documents, len(rows))
    ints = Sequence(Value("int32"))
    encoded = rows.select(range(limit)).map(
        EncodeExamples(dcfg, tokenizer, fmt, source), batched=True, batch_size=CHUNK_ROWS, with_indices=True,
        remove_columns=rows.column_names, features=Features({"ids": ints, "labels": ints}),
        num_proc=dcfg.num_proc if dcfg.num_proc > 1 and limit > CHUNK_ROWS else None,
        cache_file_name=str(store.folder / "encoded.arrow"),
        new_fingerprint=f"raclora-{store.folder.name}",  # not a hash of the tokenizer: the file is scratch
        desc=None, load_from_cache_file=False)
    for batch in encoded.iter(batch_size=CHUNK_ROWS):
        store.add([(ids, labels) for ids, labels in zip(batch["ids"], batch["labels"], strict=True) if ids is not None])
    if store.count == 0:
        raise ConfigError(f"{source}: no example fits data.seq_len={dcfg.seq_len}")


class EncodeExamples:
    """``datasets.map``'s batched function: rows -> ``{"ids", "labels"}``, each example
    rendered, tokenized and fitted to ``data.seq_len`` (None where ``data.overlong`` drops it).
    Picklable (the tokenizer travels to the ``num_proc`` workers)."""

    def __init__(self, dcfg: DataSection, tokenizer, fmt: str, source: str) -> None:
        self.dcfg, self.enc, self.source = dcfg, ChatEncoder(tokenizer, dcfg), source
        self.to_messages = chat_messages if fmt == "chat" else instruction_messages

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"ids": [], "labels": []}
        for i, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
            where = row_where(self.source, i)
            row = dict(zip(batch, values, strict=True))
            fitted = fit_example(self.enc.encode(self.to_messages(row, self.dcfg, where), where), self.dcfg, where)
            out["ids"].append(fitted.ids if fitted is not None else None)
            out["labels"].append(fitted.labels if fitted is not None else None)
        return out


def fit_example(ex: Example, dcfg: DataSection, where: str) -> Example | None:
    """``ex`` as ``data.overlong`` says (None: dropped), refusing one with nothing to train."""
    if len(ex.ids) > dcfg.seq_len:
        if dcfg.overlong == "error":
            raise ConfigError(f"{where}: {len(ex.ids)} tokens, longer than data.seq_len={dcfg.seq_len}; "
                              "raise seq_len, or set data.overlong to truncate or drop")
        if dcfg.overlong == "drop":
            return None
        ex = Example(ex.ids[: dcfg.seq_len], ex.labels[: dcfg.seq_len])
    if ex.trained == 0:
        if dcfg.overlong == "truncate":
            return None  # its response was cut away entirely
        raise ConfigError(f"{where}: no response tokens after rendering")
    return ex


# -- pass 2: blocks ------------------------------------------------------------------------------
class BlockFiles:
    """Appends blocks of named int32 fields to ``folder/<part>.<name>.bin``."""

    def __init__(self, folder: Path, part: str, names: tuple[str, ...], seq_len: int) -> None:
        self.folder, self.part, self.names, self.seq_len = folder, part, names, seq_len
        self._files = {n: (folder / f"{part}.{n}.bin").open("wb") for n in names}
        self._held: dict[str, list] = {n: [] for n in names}
        self.rows = 0

    def add(self, *fields) -> None:
        for name, values in zip(self.names, fields, strict=False):
            self._held[name].append(values)
        self.rows += 1
        if len(self._held[self.names[0]]) * self.seq_len >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        for name, held in self._held.items():
            if held:
                np.concatenate([np.asarray(h, dtype=np.int32) for h in held]).tofile(self._files[name])
                held.clear()

    def close(self) -> dict[str, list[int]]:
        """Writes what is held; returns ``{"<part>.<name>": [rows, seq_len]}``."""
        self._flush()
        for f in self._files.values():
            f.close()
        return {f"{self.part}.{n}": [self.rows, self.seq_len] for n in self.names}


def pack_text(items: Iterator[np.ndarray], seq_len: int, out: BlockFiles) -> None:
    """Concatenates token runs and cuts every ``seq_len`` tokens; the tail is dropped."""
    carry = np.zeros(0, dtype=np.int32)
    for ids in items:
        carry = np.concatenate([carry, ids])
        full = len(carry) // seq_len
        for b in range(full):
            out.add(carry[b * seq_len:(b + 1) * seq_len])
        carry = carry[full * seq_len:]


class ExamplePacker:
    """Whole examples into blocks of ``seq_len``, first fit in order (each example fits one).

    Each block yields ``input_ids``, ``labels`` (-100 on prompt and padding) and
    ``position_ids`` (0 at each example's first token; padding counts on from the last).
    """

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.pos: list[int] = []

    def add(self, ids, labels) -> Iterator[tuple[list[int], list[int], list[int]]]:
        if len(self.ids) + len(ids) > self.seq_len:
            yield self._close()
        self.ids += list(ids)
        self.labels += list(labels)
        self.pos += list(range(len(ids)))

    def finish(self) -> Iterator[tuple[list[int], list[int], list[int]]]:
        if self.ids:
            yield self._close()

    def _close(self) -> tuple[list[int], list[int], list[int]]:
        pad = self.seq_len - len(self.ids)
        start = self.pos[-1] + 1 if self.pos else 0
        block = (self.ids + [self.pad_id] * pad, self.labels + [IGNORE] * pad,
                 self.pos + list(range(start, start + pad)))
        self.ids, self.labels, self.pos = [], [], []
        return block


def write_part(dcfg: DataSection, tokenizer, stores: list[ItemStore], weights: list[float] | None, text: bool,
               folder: Path, part: str) -> dict[str, list[int]]:
    """Pass 2: the stores' items mixed and packed into ``folder/<part>.*.bin``; returns shapes."""
    order = mix_order([s.count for s in stores], weights)
    readers = [s.items() for s in stores]  # mix_order takes each source's items in order
    items = (next(readers[s]) for s, _ in order)
    if text:
        out = BlockFiles(folder, part, ("input_ids",), dcfg.seq_len)
        pack_text((ids for ids, _ in items), dcfg.seq_len, out)
        return out.close()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = BlockFiles(folder, part, ("input_ids", "labels", "position_ids"), dcfg.seq_len)
    packer = ExamplePacker(dcfg.seq_len, pad)
    for ids, labels in items:
        for block in packer.add(ids, labels):
            out.add(*block)
    for block in packer.finish():
        out.add(*block)
    return out.close()


def scratch(folder: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder for the item stores, beside the blocks (same disk)."""
    return tempfile.TemporaryDirectory(prefix=".items-", dir=folder)
