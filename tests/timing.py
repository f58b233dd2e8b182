"""The suite measures itself: every test's time (setup, call and teardown) is recorded, and the
end of each run prints the totals per folder, the slowest tests, and every test that took
longer than :data:`SLOW_S` without the ``slow`` marker (so ``make test-fast`` stays fast).

Written to ``test-durations.json`` in the repository root (ignored by git): ``{"total_s",
"passed", "failed", "skipped", "by_folder": {folder: s}, "tests": {nodeid: {"s", "slow",
"outcome"}}}``. ``make test`` prints it; README's count and time come from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SLOW_S = 20.0
"""A test above this many seconds (setup + call + teardown) belongs under ``@pytest.mark.slow``
(pyproject.toml's marker says the same)."""

OUT = Path(__file__).resolve().parents[1] / "test-durations.json"

_tests: dict[str, dict] = {}
_start = time.monotonic()


def pytest_runtest_logreport(report) -> None:
    entry = _tests.setdefault(report.nodeid, {"s": 0.0, "slow": "slow" in report.keywords, "outcome": "passed"})
    entry["s"] += report.duration
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"


def summary() -> dict:
    """The recorded run as the JSON object the module docstring describes."""
    by_folder: dict[str, float] = {}
    for nodeid, entry in _tests.items():
        folder = "/".join(nodeid.split("::")[0].split("/")[:2])
        by_folder[folder] = by_folder.get(folder, 0.0) + entry["s"]
    outcomes = [e["outcome"] for e in _tests.values()]
    return {"total_s": time.monotonic() - _start, "passed": outcomes.count("passed"),
            "failed": outcomes.count("failed"), "skipped": outcomes.count("skipped"),
            "by_folder": dict(sorted(by_folder.items(), key=lambda kv: -kv[1])),
            "tests": {k: {**v, "s": round(v["s"], 2)} for k, v in _tests.items()}}


def pytest_terminal_summary(terminalreporter) -> None:
    if not _tests:
        return
    data = summary()
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    write = terminalreporter.write_line
    terminalreporter.section("test time (tests/timing.py)")
    write(f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped in "
          f"{data['total_s'] / 60:.1f} min; written to {OUT.name}")
    for folder, s in data["by_folder"].items():
        write(f"  {folder:28} {s:8.1f} s")
    slowest = sorted(_tests.items(), key=lambda kv: -kv[1]["s"])[:8]
    write("slowest: " + "; ".join(f"{k.split('/')[-1]} {v['s']:.0f} s" for k, v in slowest))
    unmarked = [(k, v["s"]) for k, v in _tests.items() if v["s"] > SLOW_S and not v["slow"]]
    for nodeid, s in sorted(unmarked, key=lambda kv: -kv[1]):
        write(f"NOT MARKED SLOW: {nodeid} took {s:.0f} s (> {SLOW_S:.0f} s): add @pytest.mark.slow", red=True)
