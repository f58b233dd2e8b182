"""``python -m benchmarks.fidelity EXPERIMENT --json OUT [--fig PNG] [--seeds N] [--quick]``

EXPERIMENT is ``quadratic``, ``federated`` (the quadratic over 4 link-sync workers), ``digits``
or ``lm``. Prints a table, writes the JSON and a PNG figure (default: OUT with .png; none for
``federated``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks import write_json


def _quadratic(args, fig: Path) -> tuple[dict, list[str], list[list]]:
    from benchmarks.fidelity import quadratic

    res = quadratic.experiment(seeds=args.seeds, steps=200 if args.quick else args.steps)
    quadratic.plot(res, fig)
    rows = []
    for r in res["runs"]:
        curve = r["mean_curve"]
        rate = (curve[-1] / curve[0]) ** (1 / (len(curve) - 1)) if math.isfinite(curve[-1]) and curve[-1] > 0 else math.nan
        r["measured_rate"] = rate
        r["pl_rate"] = 1 - r["gamma"] * quadratic.MU * quadratic.RANK / quadratic.N
        rows.append([r["method"], r["gamma"], r["final_gap_mean"], r["final_gap_std"], r["final_gap_max"],
                     r["diverged"], rate, r["pl_rate"]])
    header = ["method", "gamma", "gap mean", "gap std", "gap max", "diverged", "rate/step", "PL rate"]
    if not args.keep_curves:
        for r in res["runs"]:
            r.pop("mean_curve")
    return res, header, rows


def _digits(args, fig: Path) -> tuple[dict, list[str], list[list]]:
    from benchmarks.fidelity import digits

    kw = dict(seeds=args.seeds, links=10, steps=30) if args.quick else dict(seeds=args.seeds)
    res = digits.experiment(**kw)
    digits.plot(res, fig)
    rows = [[m, v["acc_mean"], v["acc_std"], v["trainable"]] for m, v in res["methods"].items()]
    return res, ["method", "acc mean %", "acc std", "trainable"], rows


def _lm(args, fig: Path) -> tuple[dict, list[str], list[list]]:
    from benchmarks.fidelity import lm

    res = lm.experiment(["raclora.links=2", "raclora.steps_per_link=10"] if args.quick else [])
    lm.plot(res, fig)
    rows = [[m, v["eval_loss"], v.get("trainable", v.get("trainable_per_link")), v["seconds"]]
            for m, v in res["methods"].items()]
    return res, ["method", "eval loss", "trainable", "seconds"], rows


def _federated(args, fig: Path) -> tuple[dict, list[str], list[list]]:
    from benchmarks.fidelity import federated

    res = federated.experiment(seeds=args.seeds, links=50 if args.quick else 200)
    rows = [[r["method"], r["gamma"], r["local_steps"], r["final_gap_mean"], r["final_gap_max"], r["pl_bound_seed0"]]
            for r in res["runs"]]
    return res, ["method", "gamma", "K local", "gap mean", "gap max", "PL bound (seed 0)"], rows


RUNNERS = {"quadratic": _quadratic, "federated": _federated, "digits": _digits, "lm": _lm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=list(RUNNERS))
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--fig", help="PNG figure path (default: the JSON path with .png)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600, help="quadratic: gradient steps (links of 1 step)")
    ap.add_argument("--quick", action="store_true", help="a short run (for smoke tests)")
    ap.add_argument("--keep-curves", action="store_true", help="quadratic: keep mean gap curves in the JSON")
    args = ap.parse_args()
    from benchmarks.fidelity.common import print_table

    fig = Path(args.fig) if args.fig else Path(args.json).with_suffix(".png")
    fig.parent.mkdir(parents=True, exist_ok=True)
    res, header, rows = RUNNERS[args.experiment](args, fig)
    res["figure"] = str(fig) if fig.exists() else None
    res["table"] = print_table(f"fidelity: {args.experiment}", header, rows)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
