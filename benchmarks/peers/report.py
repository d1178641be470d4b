"""The peer benchmark's markdown tables, from the metrics run.py collects."""

from __future__ import annotations

import statistics
from pathlib import Path

from protocol import METHODS

LABELS = {
    "cg": "AID-CG, 10 iterations",
    "neumann": "Neumann, 10 HVPs",
    "itd": "ITD through 10 steps",
}

REPLICA_NOTE = (
    "hand-written (replica) is the hand-written loop timed again as an implementation of its "
    "own (an A/A comparison): its distance from 1.00× is the resolution of the ratios."
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _grid(metrics: dict, names: dict[str, str], cell) -> list[str]:
    """One row per method, one column per implementation; ``cell(key)`` or "–" where the
    library has no such method (or is missing)."""
    rows = []
    for method in METHODS:
        row = [LABELS[method]]
        for impl_id in names:
            key = f"{impl_id}/{method}"
            if impl_id in metrics["missing"]:
                row.append("not installed")
            elif key in metrics["check"]:
                row.append(cell(key))
            else:
                row.append("–")
        rows.append(row)
    return _table(["method", *names.values()], rows)


def write_report(metrics: dict, classes: dict, path: Path) -> None:
    names = {impl_id: cls.library for impl_id, cls in classes.items()}
    names.update({impl_id: impl_id for impl_id in metrics["missing"]})
    check, times, ratios = metrics["check"], metrics["times"], metrics["ratios"]
    ops, mem = metrics["ops"], metrics["memory"]
    env, protocol = metrics["environment"], metrics["protocol"]

    def seconds(key: str, kind: str = "cpu") -> float:
        return statistics.median(run[kind] for run in times[key])

    def cpu_cell(key: str) -> str:
        text = f"{seconds(key):.3f} ({ratios[key]:.2f}×)"
        return f"wrong hypergradient; {text}" if check[key]["wrong"] else text

    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Peer benchmark: FashionMNIST hyper-cleaning",
        "",
        f"{env['cpu']}, {env['threads']} thread; {versions}.",
        f"{protocol['rounds']} interleaved rounds of {protocol['steps']} timed outer steps "
        f"(after {protocol['warmup']} warm-up steps).",
        "",
        "## CPU seconds per outer step (median over rounds) and ratio to the hand-written loop "
        "(median of per-round ratios)",
        "",
        *_grid(metrics, names, cpu_cell),
        "",
        *([REPLICA_NOTE, ""] if any(k.startswith("handwritten_replica/") for k in times) else []),
        "## Wall seconds per outer step (median over rounds)",
        "",
        *_grid(metrics, names, lambda key: f"{seconds(key, 'wall'):.3f}"),
        "",
        "## First hypergradient: relative error to the float64 hand-written loop",
        "",
        f"Above {1e-3:g} the implementation is marked wrong.",
        "",
        *_grid(
            metrics,
            names,
            lambda key: (
                f"{check[key]['relative_error']:.1e}"
                + (" **wrong**" if check[key]["wrong"] else "")
            ),
        ),
        "",
        "## aten::mm + aten::addmm per outer step on the 5000×784 data (all mm + addmm)",
        "",
        *_grid(metrics, names, lambda key: f"{ops[key]['mm_on_data']} ({ops[key]['mm_all']})"),
        "",
        "## Peak resident memory, MB (above the resident set before the step)",
        "",
        *_grid(
            metrics, names, lambda key: f"{mem[key]['peak_mb']:.0f} (+{mem[key]['step_mb']:.0f})"
        ),
        "",
    ]
    counted = [k for k in times if "oracle_counts" in times[k][-1]]
    if counted:
        lines += ["## bilevel's oracle counts per outer step (problem.counts)", ""]
        rows = [
            [
                LABELS[k.split("/")[1]],
                ", ".join(f"{o} {n}" for o, n in times[k][-1]["oracle_counts"].items()),
            ]
            for k in counted
        ]
        lines += [*_table(["method", "oracle calls"], rows), ""]
    if metrics["missing"]:
        lines += ["Not run: " + "; ".join(f"{k}: {v}" for k, v in metrics["missing"].items()), ""]
    path.write_text("\n".join(lines))
