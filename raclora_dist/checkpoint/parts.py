"""Checkpoint files of ranks that do not share rank 0's disk (nodes of a cluster).

On one filesystem every rank writes its own files (DeepSpeed partitions, link-sync
``rank<R>.pt``) into rank 0's staging folder, and rank 0 renames it into place whole. A
cluster's nodes share nothing but Ray storage: a rank on another node finds no staging folder
of rank 0's, so it writes into a folder of the same name on its own disk. After the write, one
rank per disk -- the lowest rank that sees the same folder, elected by marker files, so the
rule holds whatever a launcher calls a node (Ray's local rank is per IP address, and several
nodes may share one) -- seals that folder as a **part**: renamed to ``.part-<name>-rank<R>``
with ``part-rank<R>.json`` listing its files' sizes and SHA-256, for the launcher to hand to
storage beside rank 0's checkpoint (Ray merges every worker's upload into one checkpoint
folder). :func:`raclora_dist.checkpoint.folder.verify_checkpoint` checks a part's list as it
checks ``meta.json``'s.

Resuming, :func:`raclora_dist.checkpoint.folder.install_on_every_disk` copies the storage checkpoint (every part in it) into
the run folder of each disk that holds a rank, once per disk.

Staging and marker folders carry an attempt token (:func:`raclora_dist.backends.dist.shared_token`)
so that leftovers of a crashed attempt on some node's disk never mix with a new attempt's files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

PART_MANIFEST = "part-rank{rank}.json"


def mark(marks: Path, rank: int) -> None:
    """Leaves this rank's marker in ``marks`` (created if needed); see :func:`is_first`."""
    marks.mkdir(parents=True, exist_ok=True)
    (marks / str(rank)).touch()


def is_first(marks: Path, rank: int) -> bool:
    """Whether this rank is the lowest whose marker is in ``marks``: exactly one rank per disk.

    Call it only after a barrier that follows every rank's :func:`mark` (then each rank that
    shares this disk sees the same markers), and remove ``marks`` only after a further barrier.
    """
    return min(int(p.name) for p in marks.iterdir()) == rank


def part_folder(final: Path, rank: int) -> Path:
    """Where the first rank of another disk keeps the part of checkpoint ``final`` it sealed."""
    return final.parent / f".part-{final.name}-rank{rank}"


def seal_part(staging: Path, final: Path, rank: int, manifest: Callable[[Path], dict]) -> Path | None:
    """Turns this disk's staging folder into the part of checkpoint ``final`` (first rank of a
    disk other than rank 0's, after every rank of it wrote). Returns the part, or None when
    this disk's ranks wrote nothing of their own (the staging folder is removed).

    Args:
        staging: the folder this disk's ranks wrote into. final: the checkpoint's folder name
            on rank 0's disk. rank: this rank. manifest: ``folder -> {relative path: [size,
            sha256]}`` (the checkpoint's own).
    """
    if not any(f.is_file() for f in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)
        return None
    listing = manifest(staging)
    (staging / PART_MANIFEST.format(rank=rank)).write_text(json.dumps({"files": listing}, indent=1))
    part = part_folder(final, rank)
    shutil.rmtree(part, ignore_errors=True)
    os.replace(staging, part)
    return part


def own_part(final: Path, rank: int) -> Path | None:
    """The part of checkpoint ``final`` this rank sealed (:func:`seal_part`), or None."""
    part = part_folder(final, rank)
    return part if part.is_dir() else None


def part_problems(folder: Path, check: Callable[[Path, dict], list[str]]) -> list[str]:
    """What is wrong with the parts merged into a checkpoint folder: each ``part-rank*.json``
    list checked by ``check(folder, listing)``."""
    problems = []
    for listing in sorted(folder.glob(PART_MANIFEST.format(rank="*"))):
        try:
            files = json.loads(listing.read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"{listing.name}: unreadable ({err})")
            continue
        problems += check(folder, files)
    return problems
