"""Checkpoints written by ranks on disks of their own (nodes of a cluster), each rank a thread
here and each disk a folder: ``run_dir`` is the same path on every node, so here each rank is
handed its disk's folder for it."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import raclora_dist.checkpoint.folder as ck
from raclora_dist.checkpoint.folder import (
    checkpoint_name,
    find_latest,
    install_on_every_disk,
    save_checkpoint,
    verify_checkpoint,
)
from raclora_dist.checkpoint.parts import own_part
from raclora_dist.core import ChainState

META = {"next_link": 1, "global_step": 4}


def on_ranks(disks: list[Path], fn) -> list:
    """Runs ``fn(rank, disk, barrier)`` on one thread per rank (rank r on ``disks[r]``)."""
    barrier = threading.Barrier(len(disks))
    out: list = [None] * len(disks)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            out[rank] = fn(rank, disks[rank], lambda: barrier.wait(timeout=30))
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(disks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def save(attempt: str):
    def fn(rank: int, disk: Path, barrier) -> Path | None:
        def write_state(folder: Path) -> None:
            (folder / "state").mkdir(exist_ok=True)
            (folder / "state" / f"rank{rank}.bin").write_bytes(bytes([rank]) * 8)

        final = save_checkpoint(disk, ChainState(), META, keep=2, write_state=write_state, is_main=rank == 0,
                                barrier=barrier, rank=rank, attempt=attempt)
        return final if rank == 0 else own_part(final, rank)

    return fn


def files(folder: Path) -> set[str]:
    return {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}


def test_ranks_on_another_disk_leave_one_part_with_their_files_and_storage_merges_a_whole_checkpoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # ranks 0, 1 on disk a; ranks 2, 3 on disk b
    b_root = b / "checkpoints"
    # leftovers of a crashed attempt on disk b: never mixed into this attempt's part
    (b_root / ".tmp-link-00001-step-0000004-old").mkdir(parents=True)
    (b_root / ".tmp-link-00001-step-0000004-old" / "state").mkdir()
    (b_root / ".tmp-link-00001-step-0000004-old" / "state" / "rank1.bin").write_bytes(b"stale")

    final, p1, p2, p3 = on_ranks([a, a, b, b], save("new"))
    assert files(final) >= {"state/rank0.bin", "state/rank1.bin", "rng.pt", "meta.json"}
    assert "state/rank2.bin" not in files(final)
    assert p1 is None and p3 is None  # one part per disk, sealed by its lowest rank
    assert p2 is not None and files(p2) == {"state/rank2.bin", "state/rank3.bin", "part-rank2.json"}
    for disk in (a, b):  # no staging or marker folder left, the crashed attempt's gone too
        assert not list((disk / "checkpoints").glob(".tmp-*"))

    storage = tmp_path / "storage" / "checkpoint_0"  # Ray uploads every worker's folder into one
    shutil.copytree(final, storage)
    shutil.copytree(p2, storage, dirs_exist_ok=True)
    assert verify_checkpoint(storage) == []
    (storage / "state" / "rank3.bin").write_bytes(b"damaged!")  # same size, other content
    assert verify_checkpoint(storage) == ["state/rank3.bin: content differs from when it was written (sha256)"]
    (storage / "state" / "rank3.bin").unlink()
    assert verify_checkpoint(storage) == ["state/rank3.bin: missing"]


def test_on_one_disk_every_file_is_in_the_checkpoint_and_no_part_is_left(tmp_path):
    final, *parts = on_ranks([tmp_path] * 3, save("x"))
    assert parts == [None, None]
    assert {"state/rank0.bin", "state/rank1.bin", "state/rank2.bin"} <= files(final)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")) and not list((tmp_path / "checkpoints").glob(".part-*"))
    assert verify_checkpoint(final) == []


def test_a_disk_whose_ranks_wrote_nothing_of_their_own_leaves_no_part(tmp_path):
    def fn(rank: int, disk: Path, barrier) -> Path | None:
        final = save_checkpoint(disk, ChainState(), META, keep=2, write_state=lambda _: None, is_main=rank == 0,
                                barrier=barrier, rank=rank, attempt="t")
        return own_part(final, rank)

    a, b = tmp_path / "a", tmp_path / "b"
    assert on_ranks([a, b], fn) == [None, None]
    assert not list((b / "checkpoints").iterdir())


def test_install_on_every_disk_puts_the_checkpoint_once_on_each_disk(tmp_path, monkeypatch):
    source = tmp_path / "source"
    src = save_checkpoint(source, ChainState(), META, keep=2, write_state=lambda f: (f / "x.bin").write_bytes(b"1"))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    installs: list[Path] = []
    real = ck.install_checkpoint

    def counting(src_: Path, run_dir: Path, records: bool = True) -> Path:
        installs.append(run_dir)
        return real(src_, run_dir, records=records)

    monkeypatch.setattr(ck, "install_checkpoint", counting)  # the real install, counted
    on_ranks([a, a, b, b, c], lambda rank, disk, barrier: install_on_every_disk(src, disk, rank, "tok", barrier))
    assert sorted(installs) == [a, b, c]  # rank 0 on a, then rank 2 on b and rank 4 on c
    for disk in (a, b, c):
        assert find_latest(disk).name == checkpoint_name(src)
        assert (disk / "checkpoints" / checkpoint_name(src) / "x.bin").read_bytes() == b"1"
        assert not list((disk / "checkpoints").glob(".tmp-*"))
