"""Metrics: one JSON object per line in ``RUN/metrics.jsonl``, and the console progress."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from raclora_dist.files import write_atomic


def rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


peak_rss_mb = rss_mb


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux ``VmRSS``; else the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss_mb()


def device_peak_mb(device) -> float | None:
    """Peak memory PyTorch's allocator has handed out on ``device`` since the process started
    (or the last reset), in MiB; None on a CPU, where the RSS tells it."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class MetricsWriter:
    """Appends records to ``metrics.jsonl``; flushed per record so a crash loses nothing."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_after(run_dir: Path, global_step: int, next_link: int) -> None:
    """Drops records a crashed run wrote after the checkpoint being resumed (atomic rewrite)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            continue
        if rec.get("type") in ("link", "samples") and rec["link"] >= next_link:
            continue
        if rec.get("type") == "step" and rec["step"] > global_step:
            continue
        kept.append(line)
    write_atomic(path, "".join(k + "\n" for k in kept))


def link_line(rec: dict, links: int, tokens_per_link: int) -> str:
    """The console line of a link record (the same from a worker or the driver)."""
    return (f"link {rec['link'] + 1}/{links}  step {rec['step']}  train_loss {rec['train_loss']:.4f}  eval_loss "
            f"{rec['eval_loss']:.4f}  tokens/s {tokens_per_link / rec['link_time_s']:.0f}  |sBA| {rec['update_norm']:.4g}  "
            f"merge {rec['merge_time_s'] * 1e3:.1f} ms  landed {rec['landed_fraction']:.3f}"
            + ("" if rec["merged"] else "  (discarded)"))


# Below this share of an update landing in the weights, a merge warns (4-bit in place).
LANDED_WARNING = 0.9


def resize_line(was: int, now: int, link: int) -> str:
    """The console line of a worker group that changed size (resumed at ``link``, 0-based)."""
    return (f"workers: {was} -> {now}, resumed at link {link + 1} from the latest checkpoint "
            "(the same global batch, split over the new group)")


def landed_warning(rec: dict, before: dict | None = None, threshold: float = LANDED_WARNING) -> str | None:
    """The warning for a merge that kept less than ``threshold`` of its update, else None.

    None also when the layers keep a master copy (``rec["master_weights"]``): a merge then rounds
    the working weight afresh from the master, so what one link's rounding left out is carried
    to the next (the first link's fraction can read low while the run keeps every link), and
    the advice below would be the setting already in use.

    A capped chain (``discarded_energy`` > 0: ``raclora.chain_budget`` and ``chain_links``
    recompressed it) keeps less of each link as it goes, by design: it warns once, at the link
    where the fraction first falls below ``threshold`` (``before``, the previous link's record, was above it or none was
    given), and each link's line shows the fraction from then on."""
    if not rec["merged"] or rec["landed_fraction"] >= threshold or rec.get("master_weights"):
        return None
    if rec.get("discarded_energy", 0.0) > 0:
        if before is not None and before.get("merged") and before["landed_fraction"] < threshold:
            return None
        return (f"note: link {rec['link']}: the chain is at its cap (raclora.chain_budget, raclora.chain_links); "
                f"recompressing it kept {rec['landed_fraction']:.1%} of this link's update and dropped "
                f"{rec['discarded_energy']:.1%} of the chain's energy, and later links keep less (each link's landed "
                "fraction is logged). For more, raise raclora.chain_links or raclora.chain_budget (memory and step "
                "time), set the budget to null (the exact chain: both grow every link), or use "
                "raclora.merge_mode=into_base with raclora.master_weights=cpu.")
    return (f"warning: link {rec['link']}: only {rec['landed_fraction']:.1%} of the intended update landed in the "
            f"weights (cosine {rec['landed_cosine']:.2f}); rounding the merged weight to the base's precision (4-bit, "
            "bf16) to nearest drops small updates. Keep them with raclora.merge_mode=into_base and "
            "raclora.master_weights=cpu or raclora.stochastic_rounding=true, or with raclora.merge_mode=factored.")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def interactive() -> bool:
    """Whether progress bars make sense (stderr is a terminal)."""
    return sys.stderr.isatty()


def progress_bar(total: int, initial: int):
    """A tqdm bar on an interactive terminal; None otherwise (logs get per-link lines)."""
    if not interactive():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
