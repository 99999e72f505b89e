"""Run the benchmark suite by hand: each case beside its bound, medians of several runs.

    python -m benchmarks.run            # the full sizes (minutes)
    python -m benchmarks.run --quick    # small sizes, for a look
    python -m benchmarks.run --only drain

Writes ``benchmarks/results/latest.json`` (figures, versions, machine facts), the same figures
as a Markdown table (``latest.md``) and ``docs/performance.png`` (each case as a ratio of its
bound); a ``--quick`` run writes ``quick.json``/``quick.md``, a run with ``--only`` writes
``only-<NAME>.json``/``.md``, and neither touches the plot.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import attrs
import psycopg

from benchmarks.common import DSN, Figure

ROOT = Path(__file__).resolve().parent.parent

#: The modules holding the cases, each as a list ``ALL`` of functions ``case(quick) -> Figure``,
#: run in this order.
CASE_MODULES = (
    "benchmarks.cases",
    "benchmarks.pubsub_cases",
    "benchmarks.redis_cases",
    "benchmarks.processes",
)


def machine() -> dict[str, object]:
    with psycopg.connect(DSN) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "postgresql": row[0] if row else "?",
        "packages": {
            name: metadata.version(name)
            for name in ("outboxbind", "psycopg", "psycopg-pool", "google-cloud-pubsub")
        },
    }


def plot(figures: list[Figure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.7 * len(figures) + 1.5))
    names = [textwrap.fill(f.case, 48) for f in figures]
    ratios = [f.ratio for f in figures]
    colors = [
        {True: "tab:green", False: "tab:red", None: "tab:gray"}[f.meets_target] for f in figures
    ]
    ax.barh(names, ratios, color=colors)
    for y, f in enumerate(figures):
        if f.target is not None:
            ax.plot([f.target, f.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(f.ratio, y, f"  {f.ratio:.2f}", va="center")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.invert_yaxis()
    ax.set_xlabel(
        "case / bound, measured in the same run\n"
        "(black tick: the target; green: met, red: missed, grey: no target)"
    )
    ax.set_title("outboxbind benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the table and plot from latest.json"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --only: put the new figures in latest.json in place of the old ones",
    )
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    if args.replot:
        report = json.loads((results / "latest.json").read_text())
        fields = {field.name for field in attrs.fields(Figure)}
        figures = [Figure(**{k: v for k, v in f.items() if k in fields}) for f in report["figures"]]
        (results / "latest.md").write_text(table(figures))
        plot(figures, ROOT / "docs" / "performance.png")
        return 0
    figures = []
    ids = []  # each figure's case function: its name stays when the case's text changes
    cases = [case for name in CASE_MODULES for case in importlib.import_module(name).ALL]
    for case in cases:
        if args.only and args.only not in case.__name__:
            continue
        started = time.monotonic()
        figure = case(args.quick)
        figures.append(figure)
        ids.append(case.__name__)
        verdict = {True: "meets", False: "MISSES", None: ""}[figure.meets_target]
        print(
            f"{figure.case:60} {figure.median:10.1f} {figure.unit:7} "
            f"bound {figure.bound_median:10.1f}  ratio {figure.ratio:5.2f} {verdict}"
            f"  ({time.monotonic() - started:.0f}s)",
            flush=True,
        )
    results.mkdir(exist_ok=True)
    report = {
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "figures": [
            {"id": id_, **attrs.asdict(f), "median": f.median, "bound_median": f.bound_median,
             "ratio": f.ratio, "meets_target": f.meets_target}
            for id_, f in zip(ids, figures, strict=True)
        ],
    }  # fmt: skip
    # a partial or quick run does not overwrite the full one
    name = f"only-{args.only}" if args.only else "quick" if args.quick else "latest"
    (results / f"{name}.json").write_text(json.dumps(report, indent=2))
    if args.update and args.only and not args.quick:  # re-measured cases replace their figures
        latest = json.loads((results / "latest.json").read_text())
        new = {f["id"]: f for f in report["figures"]}
        latest["figures"] = [new.pop(f.get("id", f["case"]), f) for f in latest["figures"]]
        latest["figures"] += list(new.values())
        latest.setdefault("updated", []).append({"when": report["when"], "only": args.only})
        (results / "latest.json").write_text(json.dumps(latest, indent=2))
        return main(["--replot"])
    (results / f"{name}.md").write_text(table(figures))
    if name == "latest":
        plot(figures, ROOT / "docs" / "performance.png")
    return 0


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table, as ``docs/performance.md`` shows them."""
    lines = [
        "| case | value | bound | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        sign = ">=" if f.higher_is_better else "<="
        target = f"{sign} {f.target}" if f.target is not None else "(none)"
        verdict = {True: "met", False: "missed", None: ""}[f.meets_target]
        lines.append(
            f"| {f.case} | {f.median:,.1f} {f.unit} | {f.bound}: {f.bound_median:,.1f} "
            f"| {f.ratio:.2f} | {target} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
