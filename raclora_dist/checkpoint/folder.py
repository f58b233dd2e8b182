"""Atomic checkpoints of the chain, taken at link boundaries (docs/distributed.md, "Checkpoints and resume").

Layout: ``RUN/checkpoints/link-<next link>-step-<global step>/`` (e.g. ``link-00003-step-0000120``) holds

* ``links/link-<t>.safetensors`` -- each merged link's trained factors (by module name), written
  once per run and hard-linked into every later checkpoint (:mod:`raclora_dist.checkpoint.link_files`):
  a checkpoint writes one link's worth of new bytes per link; ``current.safetensors`` -- for a
  mid-link checkpoint, the current link's factors so far. Sketches are regenerated from the
  seed; their fingerprints are in ``meta.json``;
* ``optimizer.pt`` (or ``deepspeed/``; with ``distributed.sync: link`` also every rank's
  ``rank<R>.pt``) -- the backend's optimizer state; ``rng.pt``. Tensors only, loaded as data
  (:func:`raclora_dist.backends.tensor_files.load_tensors`: a pickled callable is refused);
* ``config.yaml`` and ``metrics.jsonl`` as they were at the checkpoint (a resume whose run
  folder was lost with its node gets them back from here);
* ``meta.json`` -- written last: its presence marks the checkpoint complete. It lists every
  other file with its size and SHA-256 (``files``); :func:`verify_checkpoint` checks them,
  and :func:`find_latest` passes over a damaged checkpoint to the newest intact one.

A checkpoint is written into a temporary folder, fsynced, then renamed into place, and
``RUN/checkpoints/latest`` is replaced atomically afterwards: a crash at any point leaves
the previous checkpoint valid. The base model is not stored; resuming replays the merges.

On a cluster whose nodes have disks of their own, the files of ranks on other nodes are
*parts* (``part-rank<R>.json`` lists each one's files) that reach the checkpoint only in Ray
storage; resuming installs the whole of it on every disk (:mod:`raclora_dist.checkpoint.parts`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from raclora_dist.backends.tensor_files import load_tensors
from raclora_dist.checkpoint.link_files import Digest, StoredLink, link_name, link_or_copy, sha256
from raclora_dist.checkpoint.parts import is_first, mark, part_problems, seal_part
from raclora_dist.config import ConfigError
from raclora_dist.core.chain import ChainState
from raclora_dist.core.layer import LayerSpec
from raclora_dist.files import fsync_dir, fsync_file, write_atomic

FORMAT_VERSION = 2  # 2: one file per link under links/; 1: every link in chain.safetensors (still read)
READABLE_FORMATS = (1, 2)
log = logging.getLogger(__name__)
LINKS = "links"


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


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, chain: ChainState, meta: dict, keep: int,
                    write_state: Callable[[Path], None], is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None,
                    current: dict[str, torch.Tensor] | None = None,
                    on_write: Callable[[Path], None] | None = None,
                    rank: int = 0, attempt: str = "") -> Path:
    """Writes a complete checkpoint atomically and prunes all but the newest ``keep``.

    Every rank calls this at the same point. Rank 0 prepares the temporary folder, every
    rank writes its own state into it (``write_state``: optimizer state, engine shards),
    then rank 0 adds the chain, fsyncs and renames the folder into place. Ranks on a disk of
    their own (another node) write into a folder of the same name there, which the first of
    them seals as a part of this checkpoint (:mod:`raclora_dist.checkpoint.parts`,
    :func:`raclora_dist.checkpoint.parts.own_part`).

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
        rank: this rank. attempt: the same on every rank, new for each start of the group
            (:func:`raclora_dist.backends.dist.shared_token`): names the temporary folders, so
            a crashed attempt's leftovers on another node's disk are never mixed in.

    Returns:
        The checkpoint folder.
    """
    root = ckpt_root(run_dir)
    name = _name(meta)
    tmp = root / f".tmp-{name}{'-' + attempt if attempt else ''}"
    marks = tmp.with_name(tmp.name + ".marks")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # a disk of its own: rank 0's folder is not here
    mark(marks, rank)
    write_state(tmp)
    barrier()
    first = is_first(marks, rank)  # rank 0 on its disk; the lowest rank on any other
    barrier()
    final = root / name
    if is_main:
        shutil.rmtree(marks, ignore_errors=True)
        _commit(tmp, final, chain, meta, keep, current or {}, on_write)
    elif first:
        shutil.rmtree(marks, ignore_errors=True)
        part = seal_part(tmp, final, rank, _manifest)
        # this disk's leftovers of crashed attempts, and copies installed by older resumes
        latest = latest_name(run_dir)
        _prune(root, keep, protect=root / latest if latest else None, spare=part)
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
    known = _write_links(tmp / LINKS, chain)
    if current:
        save_file({n: f.detach().to("cpu", torch.float32).contiguous() for n, f in current.items()},
                  tmp / "current.safetensors")
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
        if f.is_file() and f.relative_to(tmp).as_posix() not in known:  # linked files are durable already
            fsync_file(f)
    full_meta["files"] = _manifest(tmp, known)
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
    fsync_file(tmp / "meta.json")
    fsync_dir(tmp / LINKS)
    fsync_dir(tmp)
    _move_into_place(tmp, final)  # the same step saved again (a resumed run) is swapped out whole
    _point_latest(root, final.name)
    _prune(root, keep, protect=final)


def _write_links(folder: Path, chain: ChainState) -> dict[str, Digest]:
    """Puts every merged link's factors in ``folder``: a hard link to the file it already has
    (:class:`StoredLink`), else written now. Returns the digests known without hashing."""
    folder.mkdir()
    known = {}
    for link in chain.merged:
        factors = chain.factors[link]
        dst = folder / link_name(link)
        if isinstance(factors, StoredLink):
            link_or_copy(factors.path, dst)
            if factors.digest is not None:
                known[f"{LINKS}/{dst.name}"] = factors.digest
        else:
            save_file({n: f.detach().to("cpu").contiguous() for n, f in factors.items()}, dst)
    return known


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
    fsync_dir(final.parent)


def _point_latest(root: Path, name: str) -> None:
    """Replaces ``root/latest`` atomically (written beside, fsynced, renamed)."""
    write_atomic(root / "latest", name + "\n", durable=True)


def _manifest(folder: Path, known: dict[str, Digest] | None = None) -> dict[str, list]:
    """``relative path -> [size, sha256]`` of every file in ``folder`` (meta.json aside); files
    in ``known`` (hard links to link files hashed when they were written) are not read again."""
    known = known or {}
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and f.name != "meta.json":
            out[rel] = known[rel] if rel in known else [f.stat().st_size, sha256(f)]
    return out


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty: intact).

    Checks that ``meta.json`` parses and is of this format, and that every file it lists has
    the size and SHA-256 it was written with (checkpoints from before the file list: that the
    chain and RNG files exist); the same for the list of each part from another node
    (``part-rank<R>.json``, :mod:`raclora_dist.checkpoint.parts`).
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return [f"meta.json: unreadable ({err})"]
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        return [f"meta.json: not a raclora checkpoint of format {' or '.join(map(str, READABLE_FORMATS))}"]
    listed = meta.get("files") or {"chain.safetensors": None, "rng.pt": None}
    return _listed_problems(path, listed) + part_problems(path, _listed_problems)


def _listed_problems(path: Path, listed: dict[str, list | None]) -> list[str]:
    problems = []
    for rel, expected in listed.items():
        f = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: not inside the checkpoint")
        elif f.is_symlink():
            problems.append(f"{rel}: a symbolic link, not a file")
        elif not f.is_file():
            problems.append(f"{rel}: missing")
        elif expected is not None and f.stat().st_size != expected[0]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, {expected[0]} when written")
        elif expected is not None and sha256(f) != expected[1]:
            problems.append(f"{rel}: content differs from when it was written (sha256)")
    return problems


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints (with ``meta.json``), oldest first."""
    return sorted(p for p in root.glob("link-*") if (p / "meta.json").is_file())


def _prune(root: Path, keep: int, protect: Path | None, spare: Path | None = None) -> None:
    """Removes leftovers of crashed writes and all but the newest ``keep`` checkpoints. A
    failure does not stop the run (its checkpoint is written) but is said, once per folder:
    undeleted checkpoints fill the disk."""
    stale = [p for p in [*root.glob(".tmp-*"), *root.glob(".part-*")] if p != spare]
    done = [p for p in _complete(root) if p != protect]
    for p in stale + done[: max(0, len(done) - (keep - 1))]:
        errors: list[str] = []
        shutil.rmtree(p, onerror=functools.partial(_note_error, errors))
        if errors:
            log.warning("could not remove old checkpoint folder %s (%d errors, first: %s); it takes disk space "
                        "until removed", p, len(errors), errors[0])


def _note_error(errors: list[str], _fn: object, path: str, exc_info: tuple) -> None:
    """shutil.rmtree's onerror (Python 3.10/3.11; onexc from 3.12): exc_info[1] is the OSError."""
    errors.append(f"{path}: {exc_info[1]}")


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


def _name(meta: dict) -> str:
    return f"link-{meta['next_link']:05d}-step-{meta['global_step']:07d}"


def checkpoint_name(folder: Path) -> str:
    """The run-folder name of a complete checkpoint (from its ``meta.json``), wherever it lies."""
    return _name(json.loads((Path(folder) / "meta.json").read_text()))


def latest_name(run_dir: Path) -> str | None:
    """The name ``latest`` points at when that checkpoint is complete here, else None."""
    root = ckpt_root(run_dir)
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else None
    return name if name and (root / name / "meta.json").is_file() else None


def install_on_every_disk(src: Path, run_dir: Path, rank: int, token: str,
                          barrier: Callable[[], None]) -> None:
    """Makes checkpoint ``src`` (Ray storage) the latest in the run folder of every disk that
    holds a rank. Collective: every rank calls it.

    Rank 0 installs it into its run folder; then on each disk where that did not land (a node
    of its own), the first of its ranks (:func:`raclora_dist.checkpoint.parts.is_first`) installs
    the same checkpoint there: every rank then resumes from its own disk, DeepSpeed's per-rank
    partitions included (storage holds every node's part).

    Args:
        src: a complete checkpoint folder, every part merged in. run_dir: the run folder.
        rank: this rank. token: the same on every rank, new for each attempt.
        barrier: a barrier over every rank.
    """
    name = checkpoint_name(src)
    if rank == 0:
        install_checkpoint(src, run_dir)
    barrier()
    missing = latest_name(run_dir) != name
    marks = ckpt_root(run_dir) / f".tmp-install-{token}.marks"
    if missing:
        mark(marks, rank)
    barrier()
    first = missing and is_first(marks, rank)
    barrier()
    if first:
        install_checkpoint(src, run_dir, records=False)  # rank 0's disk keeps the run's records
        shutil.rmtree(marks, ignore_errors=True)
    barrier()


def install_checkpoint(src: Path, run_dir: Path, records: bool = True) -> Path:
    """Makes a checkpoint folder from elsewhere (Ray storage) the run's latest (rank 0, and the
    first rank of each other disk: :func:`install_on_every_disk`).

    Copies it under ``run_dir/checkpoints`` unless the same checkpoint is already there and
    points ``latest`` at it. With ``records`` (rank 0, which keeps the run's records) it also
    restores ``config.yaml`` where the run folder lacks it, and ``metrics.jsonl`` where the run
    folder's copy does not begin with the checkpoint's (lost with its node, or left behind by
    an earlier attempt on this disk while the run went on elsewhere).
    """
    links = symlinks_in(src)
    if links:
        # A checkpoint holds plain files; a link in storage could point the copy (and the
        # manifest's digests) at any file on the node.
        raise ConfigError(f"checkpoint {src}: refused: it holds symbolic links ({', '.join(links[:3])}); "
                          "checkpoints hold plain files only")
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(src)
    final = root / name
    if not (final / "meta.json").is_file() or verify_checkpoint(final):
        tmp = root / f".tmp-install-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        for f in tmp.rglob("*"):  # durable before it becomes visible, as _commit does
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        _move_into_place(tmp, final)  # a damaged copy is swapped out whole
    if records:
        _restore_records(final, Path(run_dir))
    _point_latest(root, name)
    return final


def symlinks_in(folder: Path) -> list[str]:
    """Relative paths of the symbolic links under ``folder`` (none followed)."""
    out = []
    for top, dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
        for name in dirs + files:
            if os.path.islink(os.path.join(top, name)):
                out.append(os.path.relpath(os.path.join(top, name), folder))
    return sorted(out)


def _restore_records(ckpt: Path, run_dir: Path) -> None:
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config.is_file() and (ckpt / "config.yaml").is_file():
        shutil.copyfile(ckpt / "config.yaml", config)
    if (ckpt / "metrics.jsonl").is_file():
        saved = (ckpt / "metrics.jsonl").read_bytes()
        # A copy that goes on past the checkpoint is kept (resume truncates it there).
        if not metrics.is_file() or not metrics.read_bytes().startswith(saved):
            write_atomic(metrics, saved)


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
    except ConfigError:
        raise  # already names the file
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise ConfigError(f"checkpoint {path}: unreadable: {type(err).__name__}: {err}") from None


def _load(path: Path) -> Checkpoint:
    meta = json.loads((path / "meta.json").read_text())
    factors: Mapping[int, Mapping[str, torch.Tensor]]  # link -> tensors (format 1) or its file
    if meta["format"] == 1:
        factors, current = _read_chain_file(path / "chain.safetensors")
    else:
        files = meta.get("files", {})
        factors = {t: StoredLink(path / LINKS / link_name(t), files.get(f"{LINKS}/{link_name(t)}"))
                   for t in meta["merged"]}
        current = load_file(path / "current.safetensors") if (path / "current.safetensors").is_file() else {}
    chain = ChainState(
        merged=list(meta["merged"]),
        skipped=list(meta["skipped"]),
        factors={t: factors[t] for t in meta["merged"]},
        cumulative_update_norm=float(meta["cumulative_update_norm"]),
    )
    rng = load_tensors(path / "rng.pt")
    return Checkpoint(path, meta, chain, rng, current)


def _read_chain_file(path: Path) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A format-1 checkpoint's ``chain.safetensors``: every link's factors, and the current ones."""
    factors: dict[int, dict[str, torch.Tensor]] = {}
    current: dict[str, torch.Tensor] = {}
    for key, t in load_file(path).items():
        if key.startswith("current."):
            current[key.split(".", 1)[1]] = t
            continue
        _, link, name = key.split(".", 2)
        factors.setdefault(int(link), {})[name] = t
    return factors, current


def chain_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every factor a checkpoint folder holds, as ``link.<t>.<module>`` and (mid-link)
    ``current.<module>``: one flat dict to compare two checkpoints' chains."""
    ckpt = _load(Path(path))
    out = {f"link.{t}.{n}": f for t in ckpt.chain.merged for n, f in ckpt.chain.factors[t].items()}
    out.update({f"current.{n}": f for n, f in ckpt.current.items()})
    return out
