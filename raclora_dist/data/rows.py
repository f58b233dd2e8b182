"""Rows of a dataset on disk, read through Hugging Face ``datasets`` (no hand-written readers).

``data.path`` may be a file (``.jsonl``/``.json``, ``.parquet``, ``.csv``, ``.txt``), a folder of
such files, or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(``data.split`` picks the split). A ``.txt`` file holds documents separated by blank lines.
"""

from __future__ import annotations

from pathlib import Path

from raclora_dist.config import ConfigError, DataSection

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text",
            ".md": "text"}


def _quiet_datasets() -> None:
    """datasets' per-file progress bars and info logs are noise in a training log."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _builder(files: list[Path], where: str, field: str) -> str:
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({f.suffix or "(none)" for f in files})
        raise ConfigError(f"{field}: {where}: cannot read files ending {', '.join(suffixes)}; use one kind of "
                          f"{', '.join(sorted(BUILDERS))}, or a save_to_disk folder")
    return str(kinds.pop())  # the one kind, not None (checked above)


def first_bad_utf8(source: str) -> str:
    """Where ``source`` first fails to decode as UTF-8 ("FILE, line N"), found by reading it
    line by line (only after datasets reported a decoding error)."""
    path = Path(source)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        with f.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    return f"{f}, line {n} (byte {err.start} of the line: {line[err.start:err.start + 1]!r})"
    return str(path)


def load_rows(dcfg: DataSection, source: str, field: str = "data.path"):
    """All rows of ``source`` (one of ``field``'s paths) as a ``datasets.Dataset`` (in file order).

    Raises:
        ConfigError: the path is missing, of an unknown kind, or cannot be parsed (the message
            names the file and datasets' reason).
    """
    import datasets

    from raclora_dist.data.sources import hub_data_files, kind

    _quiet_datasets()
    path = Path(source)
    hub = kind(source) == "hub"
    if not hub and not path.exists():
        raise ConfigError(f"{field}: {source!r} does not exist (a file or a folder)")
    try:
        if hub:  # a dataset on the Hugging Face Hub: its data files, through the HF cache
            files = hub_data_files(source, dcfg.split, field)
            builder = _builder(files, source, field)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            rows = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                if dcfg.split not in rows:
                    raise ConfigError(f"data.split: {dcfg.split!r} is not a split of {source} "
                                      f"(it has {', '.join(rows)})")
                rows = rows[dcfg.split]
        else:
            files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")) if path.is_dir() \
                else [path]
            if not files:
                raise ConfigError(f"{field}: folder {source!r} holds no data files")
            builder = _builder(files, source, field)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            rows = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except ConfigError:
        raise
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {source} could not be read: not UTF-8 at {first_bad_utf8(source)}") from None
    except Exception as err:
        cause: BaseException = err
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner
        raise ConfigError(f"{field}: {source} could not be read: {type(cause).__name__}: {cause}") from None
    if len(rows) == 0:
        raise ConfigError(f"{field}: {source!r} holds no documents")
    return rows
