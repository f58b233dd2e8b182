"""Atomic checkpoints of the chain, taken at link boundaries (docs/distributed.md, "Checkpoints and resume").

Layout: ``RUN/checkpoints/link-<next link>-step-<global step>/`` (e.g. ``link-00003-step-0000120``) holds

* ``chain.safetensors`` -- each merged link's trained factor (``link.<t>.<module>``) and,
  for a mid-link checkpoint, the current link's factors so far (``current.<module>``);
  sketches are regenerated from the seed, their fingerprints are in ``meta.json``;
* ``optimizer.pt`` (or ``deepspeed/``; with ``distributed.sync: link`` also every rank's
  ``rank<R>.pt``) -- the backend's optimizer state; ``rng.pt``. Tensors only, loaded with
  ``weights_only=True``;
* ``config.yaml`` and ``metrics.jsonl`` as they were at the checkpoint (a resume whose run
  folder was lost with its node gets them back from here);
* ``meta.json`` -- written last: its presence marks the checkpoint complete. It lists every
  other file with its size and SHA-256 (``files``); :func:`verify_checkpoint` checks them,
  and :func:`find_latest` passes over a damaged checkpoint to the newest intact one.

A checkpoint is written into a temporary folder, fsynced, then renamed into place, and
``RUN/checkpoints/latest`` is replaced atomically afterwards: a crash at any point leaves
the previous checkpoint valid. The base model is not stored; resuming replays the merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from raclora_dist.config import ConfigError
from raclora_dist.core.chain import ChainState
from raclora_dist.core.layer import LayerSpec

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    meta: dict
    chain: ChainState
    rng: torch.Tensor  # optimizer/engine state stays in the folder for the backend to load
    current: dict[str, torch.Tensor]  # mid-link: the link's trainable factors so far

    @property
    def step_in_link(self) -> int:
        """Steps of ``next_link`` already done (0 at a link boundary)."""
        return int(self.meta.get("step_in_link", 0))

    @property
    def next_link(self) -> int:
        return int(self.meta["next_link"])

    @property
    def global_step(self) -> int:
        return int(self.meta["global_step"])

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(**d) for d in self.meta["layers"]]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, chain: ChainState, meta: dict, keep: int,
                    write_state: Callable[[Path], None], is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None,
                    current: dict[str, torch.Tensor] | None = None,
                    on_write: Callable[[Path], None] | None = None) -> Path:
    """Writes a complete checkpoint atomically and prunes all but the newest ``keep``.

    Every rank calls this at the same point. Rank 0 prepares the temporary folder, every
    rank writes its own state into it (``write_state``: optimizer state, engine shards),
    then rank 0 adds the chain, fsyncs and renames the folder into place.

    Args:
        run_dir: the run folder.
        chain: the chain record (merged links and their factors).
        meta: JSON-able facts; must hold ``next_link`` and ``global_step``.
        keep: how many complete checkpoints to keep.
        write_state: called on every rank with the temporary folder.
        is_main: whether this is rank 0. barrier: a cross-rank barrier.
        current: mid-link only: the link's full trainable factors so far, by module.
        on_write: rank 0, called with the temporary folder once the chain file is in it and
            before ``meta.json`` (callbacks' ``on_checkpoint_write``).

    Returns:
        The checkpoint folder.
    """
    root = ckpt_root(run_dir)
    name = f"link-{meta['next_link']:05d}-step-{meta['global_step']:07d}"
    tmp = root / f".tmp-{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write_state(tmp)
    barrier()
    final = root / name
    if is_main:
        _commit(tmp, final, chain, meta, keep, current or {}, on_write)
    barrier()
    return final


def _commit(tmp: Path, final: Path, chain: ChainState, meta: dict, keep: int,
            current: dict[str, torch.Tensor], on_write: Callable[[Path], None] | None = None) -> None:
    root = final.parent
    # The config and the metrics so far travel with the checkpoint (Ray storage, another node):
    # a run resumed where its run folder is gone still has every record up to this point.
    for name in ("config.yaml", "metrics.jsonl"):
        if (root.parent / name).is_file():
            shutil.copyfile(root.parent / name, tmp / name)
    tensors = {f"link.{t}.{n}": f.contiguous() for t, fs in chain.factors.items() for n, f in fs.items()}
    tensors.update({f"current.{n}": f.detach().to("cpu", torch.float32).contiguous() for n, f in current.items()})
    save_file(tensors, tmp / "chain.safetensors")
    if on_write is not None:
        on_write(tmp)
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    full_meta = {
        "format": FORMAT_VERSION,
        **meta,
        "merged": chain.merged,
        "skipped": chain.skipped,
        "cumulative_update_norm": chain.cumulative_update_norm,
    }
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    full_meta["files"] = _manifest(tmp)
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
    _fsync_file(tmp / "meta.json")
    _fsync_dir(tmp)
    _move_into_place(tmp, final)  # the same step saved again (a resumed run) is swapped out whole
    _point_latest(root, final.name)
    _prune(root, keep, protect=final)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Renames the complete folder ``tmp`` to ``final``, swapping out one already there."""
    if final.exists():
        trash = final.parent / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _point_latest(root: Path, name: str) -> None:
    """Replaces ``root/latest`` atomically (written beside, fsynced, renamed)."""
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, list]:
    """``relative path -> [size, sha256]`` of every file in ``folder`` (meta.json aside)."""
    return {f.relative_to(folder).as_posix(): [f.stat().st_size, _sha256(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "meta.json"}


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty: intact).

    Checks that ``meta.json`` parses and is of this format, and that every file it lists has
    the size and SHA-256 it was written with (checkpoints from before the file list: that the
    chain and RNG files exist).
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return [f"meta.json: unreadable ({err})"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return [f"meta.json: not a raclora checkpoint of format {FORMAT_VERSION}"]
    listed = meta.get("files") or {"chain.safetensors": None, "rng.pt": None}
    problems = []
    for rel, expected in listed.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif expected is not None and f.stat().st_size != expected[0]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, {expected[0]} when written")
        elif expected is not None and _sha256(f) != expected[1]:
            problems.append(f"{rel}: content differs from when it was written (sha256)")
    return problems


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints (with ``meta.json``), oldest first."""
    return sorted(p for p in root.glob("link-*") if (p / "meta.json").is_file())


def _prune(root: Path, keep: int, protect: Path) -> None:
    for p in root.glob(".tmp-*"):  # leftovers of crashed writes
        shutil.rmtree(p, ignore_errors=True)
    done = [p for p in _complete(root) if p != protect]
    for p in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def find_latest(run_dir: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete and intact checkpoint of a run, or None.

    Tries ``latest`` first when it names a complete checkpoint, then the others newest first
    (a crash between the rename and the pointer update leaves the pointer one behind, which
    is still valid). A damaged checkpoint (:func:`verify_checkpoint`) is passed over and,
    with ``report``, named with what is wrong with it.
    """
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return None
    done = _complete(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
    for path in done:
        problems = verify_checkpoint(path)
        if not problems:
            return path
        if report is not None:
            report(f"checkpoint {path.name} is damaged ({'; '.join(problems)}); passing over it")
    return None


def damaged_checkpoints(run_dir: Path) -> dict[str, list[str]]:
    """``name -> problems`` of the complete checkpoints that fail :func:`verify_checkpoint`."""
    root = ckpt_root(run_dir)
    out = {p.name: verify_checkpoint(p) for p in (_complete(root) if root.is_dir() else [])}
    return {k: v for k, v in out.items() if v}


def install_checkpoint(src: Path, run_dir: Path) -> Path:
    """Makes a checkpoint folder from elsewhere (Ray storage) the run's latest (rank 0 only).

    Copies it under ``run_dir/checkpoints`` unless the same checkpoint is already there,
    restores ``config.yaml`` and ``metrics.jsonl`` (the records up to the checkpoint) when the
    run folder lacks them, and points ``latest`` at it.
    """
    meta = json.loads((Path(src) / "meta.json").read_text())
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"link-{meta['next_link']:05d}-step-{meta['global_step']:07d}"
    final = root / name
    if not (final / "meta.json").is_file() or verify_checkpoint(final):
        tmp = root / f".tmp-install-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        for f in tmp.rglob("*"):  # durable before it becomes visible, as _commit does
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        _move_into_place(tmp, final)  # a damaged copy is swapped out whole
    for kept in ("config.yaml", "metrics.jsonl"):  # a run folder lost with its node: restore them
        if not (Path(run_dir) / kept).is_file() and (final / kept).is_file():
            shutil.copyfile(final / kept, Path(run_dir) / kept)
    _point_latest(root, name)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Loads a checkpoint folder (tensors only; no pickled code is executed).

    Raises:
        ConfigError: the checkpoint is damaged (named by file) or unreadable.
    """
    problems = verify_checkpoint(path)
    if problems:
        raise ConfigError(f"checkpoint {path}: damaged: {'; '.join(problems)}")
    try:
        return _load(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise ConfigError(f"checkpoint {path}: unreadable: {type(err).__name__}: {err}") from None


def _load(path: Path) -> Checkpoint:
    meta = json.loads((path / "meta.json").read_text())
    factors: dict[int, dict[str, torch.Tensor]] = {}
    current: dict[str, torch.Tensor] = {}
    for key, t in load_file(path / "chain.safetensors").items():
        if key.startswith("current."):
            current[key.split(".", 1)[1]] = t
            continue
        _, link, name = key.split(".", 2)
        factors.setdefault(int(link), {})[name] = t
    chain = ChainState(
        merged=list(meta["merged"]),
        skipped=list(meta["skipped"]),
        factors={t: factors[t] for t in meta["merged"]},
        cumulative_update_norm=float(meta["cumulative_update_norm"]),
    )
    rng = torch.load(path / "rng.pt", weights_only=True)
    return Checkpoint(path, meta, chain, rng, current)
