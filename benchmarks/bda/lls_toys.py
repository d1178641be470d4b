"""LLS toys (1-D and n = 100): ‖x − x*‖/‖x*‖ and f vs outer step for BDA and LLS methods.

    python benchmarks/bda/lls_toys.py --steps 150 --dims 1 --ks 4,16,64 --out DIR

Every run is ``bl.solve`` on ``bilevel.tasks.lls_toy`` with the task's defaults (x₀ = y₀ = 0,
s_l = inner_lr = 0.5, cold inner start, outer SGD step 0.5) and K inner steps.
Writes ``results.json`` (every logged row), ``table.md`` (with total oracle calls and CPU
seconds) and ``distance.png`` / ``upper_value.png`` (against outer steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel.tasks.lls_toy import lls_toy  # noqa: E402

# label -> (method, options); "K/4" is filled in per K
VARIANTS = {
    "bda (μ=0.5, s_u=0.5)": ("bda", {}),
    "bda (μ=0.99, s_u=1)": ("bda", {"mu": 0.99, "s_u": 1.0}),
    "bda truncated (K/4)": ("bda", {"mode": "truncated", "truncate": "K/4"}),
    "bda one-stage (α=0.5)": ("bda", {"mode": "onestage"}),
    "itd": ("itd", {}),
    "itd truncated (K/4)": ("itd", {"truncate": "K/4"}),
    "cg": ("cg", {}),
    "neumann": ("neumann", {}),
}


def run(dim: int, k: int, label: str, steps: int, log_every: int) -> dict:
    name, options = VARIANTS[label]
    options = {key: (k // 4 if value == "K/4" else value) for key, value in options.items()}
    task = lls_toy(dim=dim)
    method = bl.method(name, **task.method_options(name, inner_steps=k, **options))
    start = time.process_time()
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        method,
        callbacks=task.callbacks,
        log_every=log_every,
        **{**task.solve_defaults, "steps": steps},
    )
    rows = [
        {"step": r["step"], "distance": r["distance"], "upper_value": r["upper_value"]}
        for r in result.history
    ]
    seconds = time.process_time() - start
    x_mean = float(result.x["x"].mean())
    calls = int(sum(result.history[-1]["oracles"].values()))
    return {"dim": dim, "K": k, "label": label, "seconds": seconds, "x_mean": x_mean,
            "oracle_calls": calls, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--ks", default="4,16,64")
    parser.add_argument("--dims", default="1,100")
    parser.add_argument("--out", default="benchmarks/bda/lls_toys")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    runs = []
    for dim in dims:
        for k in ks:
            for label in VARIANTS:
                last = run(dim, k, label, args.steps, args.log_every)
                runs.append(last)
                distance = last["rows"][-1]["distance"]
                print(f"n={dim} K={k} {label}: mean x {last['x_mean']:.4f}, distance "
                      f"{distance:.4f}, {last['seconds']:.1f} s", flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    write_table(runs, out / "table.md", args.steps)
    for metric in ("distance", "upper_value"):
        plot(runs, dims, ks, metric, out / f"{metric}.png")


def write_table(runs: list[dict], path: Path, steps: int) -> None:
    lines = [
        f"After {steps} outer steps: mean of x, ‖x − x*‖/‖x*‖, f(x, y_K), total oracle calls "
        "and CPU seconds of the run (1 thread, evaluation included).",
        "",
        "| n | K | method | mean x | distance | f | oracle calls | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = r["rows"][-1]
        cells = [r["dim"], r["K"], r["label"], f"{r['x_mean']:.4f}", f"{last['distance']:.4f}",
                 f"{last['upper_value']:.4g}", r["oracle_calls"],
                 f"{r['seconds']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(runs: list[dict], dims: list[int], ks: list[int], metric: str, path: Path) -> None:
    fig, axes = plt.subplots(
        len(dims), len(ks), figsize=(4.2 * len(ks), 3.4 * len(dims)), squeeze=False
    )
    for i, dim in enumerate(dims):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            for r in runs:
                if r["dim"] == dim and r["K"] == k:
                    steps = [row["step"] for row in r["rows"]]
                    values = [max(row[metric], 1e-12) for row in r["rows"]]
                    ax.plot(steps, values, label=r["label"])
            ax.set_yscale("log")
            ax.set_title(f"n = {dim}, K = {k}")
            ax.set_xlabel("outer step")
            ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
