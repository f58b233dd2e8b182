"""Tokenize once: packed blocks cached on disk and memory-mapped by every rank.

The first process that needs a data set (the launching process's preflight, or rank 0)
reads, renders, tokenizes and packs it in a stream (:func:`raclora_dist.data.batches.write_blocks`:
memory bounded by a chunk of rows) straight into raw int32 files in ``data.cache_dir/<key>/``; every process then
maps those files (``torch.from_file``, copy-on-write), so the pages are shared through the
page cache and a corpus larger than a process's memory is read only where batches touch it.

The key is a hash of everything the blocks depend on: the data settings, each source
file's name, size and modification time, the tokenizer (its full definition and chat
template) and :data:`VERSION` of this code. A changed file or setting is a new key; an entry
is written into a temporary folder and renamed into place, so a reader never sees half of
one, and two writers racing leave one whole entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from raclora_dist.config import ConfigError, DataSection

logger = logging.getLogger(__name__)

VERSION = 2  # bump when the rendering or packing of blocks changes (2: streamed; the same blocks, rebuilt once)
SETTINGS_NOT_IN_KEY = ("cache_dir", "eval_fraction", "num_proc")  # the split is taken after the cache


def cache_root(dcfg: DataSection) -> Path:
    if dcfg.cache_dir is not None:
        return Path(dcfg.cache_dir)
    env = os.environ.get("RACLORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "raclora" / "tokenized"


def _files(source: str, split: str) -> list[list]:
    from raclora_dist.data.sources import hub_data_files, kind

    path = Path(source)
    if kind(source) == "hub":
        files = hub_data_files(source, split)  # the snapshot's files: a new revision is new data
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((spec + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_key(dcfg: DataSection, tokenizer) -> str:
    """The hash naming the cache entry of ``dcfg``'s blocks under ``tokenizer``."""
    settings = {k: v for k, v in dcfg.model_dump(mode="json").items() if k not in SETTINGS_NOT_IN_KEY}
    settings.pop("tokenizer", None)  # the tokenizer's content counts, not where it lies
    sources = {p: _files(p, dcfg.split) for p in dcfg.paths + dcfg.eval_paths}
    blob = json.dumps({"v": VERSION, "settings": settings, "sources": sources,
                       "tokenizer": _tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def write_tensors(folder: Path, sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[int]]:
    """Writes in-memory blocks as an entry's files would hold them; returns their shapes."""
    shapes = {}
    for part, fields in sets.items():
        for name, t in fields.items():
            t.to(torch.int32).contiguous().numpy().tofile(folder / f"{part}.{name}.bin")
            shapes[f"{part}.{name}"] = list(t.shape)
    return shapes


def _read(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    meta = json.loads((folder / "meta.json").read_text())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, shape in meta["shapes"].items():
        part, name = key.split(".", 1)
        n = 1
        for d in shape:
            n *= d
        t = torch.from_file(str(folder / f"{key}.bin"), shared=False, size=n, dtype=torch.int32)
        out.setdefault(part, {})[name] = t.view(*shape)
    return out


def _store(tmp: Path, entry: Path) -> None:
    """Renames a written entry into place; another process's finished entry is kept, an
    unfinished one (no meta.json) replaced, and any other failure said, naming the folder."""
    for attempt in range(2):
        try:
            os.rename(tmp, entry)
            return
        except OSError as err:
            if (entry / "meta.json").is_file():
                return  # another process finished the same entry first: keep theirs
            if attempt == 0 and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)  # a leftover without meta.json: not an entry
                continue
            raise ConfigError(f"data.cache_dir: could not store the tokenized data in {entry} "
                              f"({type(err).__name__}: {err})") from None


def cached_blocks(dcfg: DataSection, tokenizer, write: Callable[[Path], dict[str, list[int]]]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """The blocks of ``dcfg`` from the cache, written first if absent by ``write(folder)``
    (which fills a temporary folder with ``<part>.<field>.bin`` files and returns their shapes;
    a line is logged when it does).

    Returns:
        ``{"train": fields, "eval"?: fields}`` of memory-mapped int32 (N, T) tensors.
    """
    root = cache_root(dcfg)
    entry = root / cache_key(dcfg, tokenizer)
    if not (entry / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        try:
            shapes = write(tmp)
            (tmp / "meta.json").write_text(json.dumps({"version": VERSION, "shapes": shapes}))
            _store(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if logger.isEnabledFor(logging.INFO):
            train = _read(entry)["train"]
            trained = int((train["labels"][:, 1:] != -100).sum()) if "labels" in train else train["input_ids"].numel()
            logger.info(f"tokenized {', '.join(dcfg.paths)}: {len(train['input_ids'])} sequences of {dcfg.seq_len} tokens "
                f"({trained:,} with loss) -> {entry}")
    return _read(entry)
