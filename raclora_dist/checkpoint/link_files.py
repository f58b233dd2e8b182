"""The record of merged links on disk: one safetensors file per link, written once.

A chain of T links needs every link's trained factor to be rebuilt (resume replays them) and
exported. Held in RAM and rewritten whole by every checkpoint, that record costs O(T) memory
per rank and O(T^2) bytes written over a run. Here instead:

* each link's factors are written once, to ``RUN/checkpoints/chain/link-<t>.safetensors``
  (:class:`LinkStore`, rank 0), when the first checkpoint after the link is taken;
* a checkpoint holds hard links to those files in its own ``links/`` folder, so it stays
  self-contained (Ray storage copies it, pruning one checkpoint never breaks another) while
  writing no byte twice; where hard links are impossible the file is copied;
* after a checkpoint a rank holds no merged link in RAM: :class:`StoredLink` reads a link's
  factors from its file (memory-mapped) when replay or export asks for them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raclora_dist.files import fsync_file

Digest = list  # [size in bytes, sha256 hex], as a checkpoint's meta.json lists its files


def link_name(link: int) -> str:
    """The file name of link ``link``'s factors."""
    return f"link-{link:05d}.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Digest:
    """Writes ``tensors`` to ``path`` atomically (beside it, fsynced, renamed); returns its digest."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    return [path.stat().st_size, sha256(path)]


def link_or_copy(src: Path, dst: Path) -> None:
    """Makes ``dst`` the same file as ``src``: a hard link (no bytes written), else a copy.
    A file already at ``dst`` is replaced atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
    os.replace(tmp, dst)


class StoredLink(Mapping[str, torch.Tensor]):
    """One merged link's factors (module name -> factor), read from their file on demand.

    Args:
        path: the link's safetensors file. digest: its ``[size, sha256]`` where known (a
            checkpoint's file list, or when it was written), so that no one hashes it again.
    """

    def __init__(self, path: Path, digest: Digest | None = None) -> None:
        self.path, self.digest = Path(path), digest
        self._handle = None

    def _open(self):
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")  # memory-mapped; nothing read yet
        return self._handle

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._open().get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for a missing key
            raise KeyError(f"{self.path.name}: no factor for module {name!r}") from err

    def __iter__(self) -> Iterator[str]:
        return iter(self._open().keys())

    def __len__(self) -> int:
        return len(self._open().keys())


class LinkStore(MutableMapping[int, Mapping[str, torch.Tensor]]):
    """``link -> {module: factor}`` for the chain's record, holding in RAM only the links merged
    since the last :meth:`spill`.

    Args:
        folder: where rank 0 writes each link's file (``RUN/checkpoints/chain``); None on the
            other ranks, which need no record (rank 0 writes the checkpoints): there
            :meth:`spill` drops the links, and reading one afterwards is an error.
        initial: links already recorded (a resumed checkpoint's :class:`StoredLink` files, or
            in-RAM factors); stored files are hard-linked into ``folder``.
    """

    def __init__(self, folder: Path | None, initial: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._ram: dict[int, Mapping[str, torch.Tensor]] = {}
        self._stored: dict[int, StoredLink] = {}
        self._dropped: set[int] = set()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        for link, factors in (initial or {}).items():
            if isinstance(factors, StoredLink) and self.folder is not None:
                dst = self.folder / link_name(link)
                if dst.resolve() != factors.path.resolve():
                    link_or_copy(factors.path, dst)
                self._stored[link] = StoredLink(dst, factors.digest)
            else:
                self._ram[link] = factors

    def __getitem__(self, link: int) -> Mapping[str, torch.Tensor]:
        if link in self._ram:
            return self._ram[link]
        if link in self._stored:
            return self._stored[link]
        if link in self._dropped:
            raise KeyError(f"link {link}: its factors are kept by rank 0 only")
        raise KeyError(link)

    def __setitem__(self, link: int, factors: Mapping[str, torch.Tensor]) -> None:
        self._stored.pop(link, None)
        self._dropped.discard(link)
        self._ram[link] = factors

    def __delitem__(self, link: int) -> None:
        for d in (self._ram, self._stored):
            d.pop(link, None)
        self._dropped.discard(link)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._ram, *self._stored, *self._dropped}))

    def __len__(self) -> int:
        return len({*self._ram, *self._stored, *self._dropped})

    @property
    def in_ram(self) -> list[int]:
        """The links whose factors this rank holds in memory."""
        return sorted(self._ram)

    def spill(self) -> None:
        """Writes every link held in RAM to its file, once, and lets go of the tensors (rank 0);
        elsewhere just lets go of them."""
        for link, factors in sorted(self._ram.items()):
            if self.folder is None:
                self._dropped.add(link)
                continue
            path = self.folder / link_name(link)
            self._stored[link] = StoredLink(path, write_tensors(path, dict(factors)))
        self._ram.clear()
