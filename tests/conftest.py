"""Shared fixtures: a small slice of the bundled corpus; and the suite measuring itself
(tests/timing.py). Helpers live in tests/helpers.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CORPUS, ROOT
from tests.timing import pytest_runtest_logreport, pytest_terminal_summary  # noqa: F401 (pytest hooks)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` run where CUDA is available and are skipped elsewhere (each has a
    CPU counterpart that runs everywhere, named in its docstring)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_bench.sh runs it on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # (keywords would match a parameter id "gpu")
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The bundled corpus (built by `make data`; built here if missing)."""
    if not CORPUS.is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_corpus.py"), "--out", str(CORPUS)], check=True)
    return CORPUS


@pytest.fixture(scope="session")
def small_data(corpus: Path, tmp_path_factory) -> Path:
    """The first 60 documents of the corpus as a JSONL file."""
    out = tmp_path_factory.mktemp("data") / "small.jsonl"
    lines = corpus.read_text().splitlines()[:60]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def one_process_run(small_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """``(config, run)``: the tiny model's config and its one-process run, the reference every
    engine, HSDP and Ray Train run is held to; made once (10 s) for every module that needs
    it. Read only: a test writes its own runs in a folder of its own."""
    from tests.distributed.engines import one_process_reference

    _, cfg, single = one_process_reference(tmp_path_factory.mktemp("one-process"), small_data)
    return cfg, single
