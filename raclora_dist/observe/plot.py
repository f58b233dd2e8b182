"""A PNG of a run: loss per step (with eval loss per link) and per-link update norms."""

from __future__ import annotations

from pathlib import Path

from raclora_dist.observe.metrics import read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draws ``RUN/plot.png`` from ``metrics.jsonl``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    steps = [r for r in recs if r["type"] == "step"]
    links = [r for r in recs if r["type"] == "link"]
    evals = [r for r in recs if r["type"] == "eval"] + links
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=4, label="eval loss (after merge)")
    for r in links:
        ax1.axvline(r["step"], color="grey", lw=0.4, alpha=0.5)
    ax1.set_xlabel("optimizer step (grey: link boundaries)")
    ax1.set_ylabel("loss")
    ax1.legend()
    idx = [r["link"] + 1 for r in links]
    ax2.bar(idx, [r["update_norm"] for r in links], label=r"$\|s B_t A_t\|_F$ per link")
    ax2.plot(idx, [r["cumulative_update_norm"] for r in links], "k.-", label="cumulative (sum)")
    ax2.set_xlabel("link")
    ax2.set_ylabel("update norm")
    ax2.legend()
    fig.suptitle(f"RAC-LoRA run {run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "plot.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
