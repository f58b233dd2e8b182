"""Where a pretrained model comes from: a local folder, a Hugging Face Hub name, or a folder in
object storage, each turned into a local folder that is then streamed like any other.

``model.name_or_path`` (and a ``data.tokenizer`` that is not ``bytes``) may be

* a local folder (as before);
* a Hub name, ``org/name`` or ``org/name@revision``: resolved through the standard Hugging Face
  cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``), downloaded once
  into it (safetensors, JSON, tokenizer files only: no pickled weights, no code);
* a URI that pyarrow's filesystems read (``s3://``, ``gs://``, ``hdfs://``, ``file://``), as
  ``ray.storage_path`` may be: fetched once per machine into ``$RACLORA_CACHE/models/`` (default
  ``~/.cache/raclora/models``), sizes checked against the listing, then reused while the
  listing is unchanged.

One process per machine fetches while the others wait (a file lock in the cache), so the
ranks of a node share one download. ``weights=False`` fetches everything but the safetensors
(``raclora validate``: the architecture and tokenizer, without the weights).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from raclora_dist.config import ConfigError
from raclora_dist.files import write_atomic

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
SMALL = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # config, tokenizer, template


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".text", ".md", ".safetensors", ".yaml")


def kind(value: str) -> str:
    """``"uri"``, ``"hub"`` or ``"path"``: how ``value`` names a model or data set. A name that
    exists on disk, starts like a path (``/``, ``.``, ``~``) or ends like a file is a path; so
    is anything but ``org/name[@revision]``."""
    if "://" in value:
        return "uri"
    if (value.startswith(("/", ".", "~")) or value.lower().endswith(FILE_SUFFIXES) or Path(value).exists()
            or not HUB_NAME.match(value)):
        return "path"
    return "hub"


def local_folder(value: str, field: str = "model.name_or_path", weights: bool = True) -> Path:
    """The local folder ``value`` names, fetched first if it is a Hub name or a URI.

    Raises:
        ConfigError: the name cannot be found (offline and not cached, no such repository or
            revision, an empty or unreadable URI); names the field, the name and the cache.
    """
    how = kind(value)
    if how == "path":
        return Path(value).expanduser()
    return _fetched(value, field, weights, how)


@cache
def _fetched(value: str, field: str, weights: bool, how: str) -> Path:
    if how in ("hub", "hub-dataset"):
        return _from_hub(value, field, weights, "dataset" if how == "hub-dataset" else "model")
    return _from_uri(value, field, weights)


def describe(value: str, field: str = "model.name_or_path") -> str:
    """Where ``value``'s files come from, for ``raclora validate`` (downloads nothing)."""
    how = kind(value)
    if how == "path":
        return f"{field}: the local folder {value}"
    if how == "hub":
        from huggingface_hub import constants

        repo, revision = _split(value)
        cached = _cached_snapshot(repo, revision)
        where = f"cached at {cached}" if cached else (
            "not in the cache, and HF_HUB_OFFLINE is set: training will fail" if constants.HF_HUB_OFFLINE
            else f"downloaded on first use into {constants.HF_HUB_CACHE}")
        return f"{field}: {repo} (revision {revision or 'main'}) from the Hugging Face Hub, {where}"
    folder = _cache_folder(value)
    state = "fetched before, reused if unchanged" if (folder / MARKER).is_file() else "fetched on first use"
    return f"{field}: {value} from object storage, {state} into {folder}"


def _split(value: str) -> tuple[str, str | None]:
    repo, _, revision = value.partition("@")
    return repo, revision or None


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=["config.json"]))
    except Exception:
        return None


def _from_hub(value: str, field: str, weights: bool, repo_type: str = "model") -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = _split(value)
    patterns = DATA_FILES if repo_type == "dataset" else SMALL + (WEIGHTS if weights else [])
    try:
        with node_lock(f"hub-{repo_type}-{repo}-{revision}"):
            folder = Path(snapshot_download(repo, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                            local_files_only=constants.HF_HUB_OFFLINE))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConfigError(f"{field}: {value!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          "HF_HUB_OFFLINE is set (nor a local folder here); download it once (`huggingface-cli "
                          f"download {repo}`), point HF_HOME at a cache that has it, or unset HF_HUB_OFFLINE") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise ConfigError(f"{field}: {value!r}: {type(err).__name__} on the Hugging Face Hub (a gated model "
                          "needs HF_TOKEN)") from None
    except HfHubHTTPError as err:
        raise ConfigError(f"{field}: {value!r}: the Hugging Face Hub answered {err}") from None
    if repo_type == "model" and weights and not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{field}: {value!r} has no safetensors weights (only safetensors are loaded: "
                          "no pickled .bin files)")
    return folder


# -- datasets on the Hub ------------------------------------------------------------------------
DATA_FILES = ["*.jsonl", "*.json", "*.parquet", "*.csv", "*.txt"]


def hub_data_files(value: str, split: str, field: str = "data.path") -> list[Path]:
    """The data files of a Hub dataset repository (``org/name[@revision]``) for ``split``:
    fetched through the Hugging Face cache as models are, then the repository's files of
    ``split`` (a folder or a file name starting with it, as the Hub's own layout names them),
    or all its data files when none is named so. README and hidden files are not data."""
    folder = _fetched(value, field, False, "hub-dataset")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name.lower() != "readme.md"
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                   and any(fnmatch.fnmatch(f.name, p) for p in DATA_FILES))
    if not files:
        raise ConfigError(f"{field}: the Hub dataset {value!r} holds no data files ({', '.join(DATA_FILES)})")
    named = [f for f in files if split in f.relative_to(folder).parts[:-1] or f.name.startswith(split)]
    return named or files


# -- object storage ---------------------------------------------------------------------------
MARKER = ".raclora-fetched.json"  # what was fetched: {relative path: size}


def model_cache() -> Path:
    """``$RACLORA_MODEL_CACHE``, default ``~/.cache/raclora/models``."""
    env = os.environ.get("RACLORA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "raclora" / "models"


def _cache_folder(uri: str) -> Path:
    return model_cache() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]


def _from_uri(uri: str, field: str, weights: bool) -> Path:
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri.rstrip("/"))
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: {uri!r} cannot be listed ({type(err).__name__}: {err})") from None
    listing = {i.path[len(root):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}
    wanted = {rel: size for rel, size in listing.items()
              if any(fnmatch.fnmatch(Path(rel).name, p) for p in SMALL + (WEIGHTS if weights else []))}
    if not wanted:
        raise ConfigError(f"{field}: {uri!r} holds no model files (config.json, safetensors)")
    folder = _cache_folder(uri)
    with node_lock(f"uri-{folder.name}"):
        have = _have(folder)
        missing = {rel: size for rel, size in wanted.items()
                   if have.get(rel) != size or not (folder / rel).is_file() or (folder / rel).stat().st_size != size}
        for rel, size in missing.items():  # each file fetched beside its place, then renamed in
            dst = folder / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.part")
            try:
                pafs.copy_files(f"{root}/{rel}", str(tmp), source_filesystem=filesystem)
                if tmp.stat().st_size != size:
                    raise ConfigError(f"{field}: {uri}/{rel}: fetched {tmp.stat().st_size} bytes, the listing "
                                      f"says {size}")
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
            have[rel] = size
            marker = folder / MARKER
            write_atomic(marker, json.dumps(have))
    return folder


def _have(folder: Path) -> dict[str, int]:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by the processes of this machine (``flock`` on a file in the
    cache): the first fetches, the others wait and then find the files in place."""
    import fcntl

    locks = model_cache() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".lock")
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
