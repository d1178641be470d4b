"""Few-shot (glyph dataset, feature form, 5-way 5-shot): esj vs itd vs cg under one time budget,
then meta-test accuracy with its 95% interval. Usage:

    python benchmarks/es/few_shot_budget.py --budget 60 --episodes 200 --out benchmarks/es/few_shot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import bilevel as bl
from bilevel.tasks import make
from bilevel.tasks.few_shot import evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--methods", default="esj,itd,cg")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/es/few_shot"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.methods.split(","):
        task = make("few_shot")
        method = bl.method(name, **task.method_options(name))
        result = bl.solve(
            task.problem,
            task.x0,
            task.y0,
            method,
            steps=10_000,
            outer_optimizer="adam",
            outer_lr=task.solve_defaults["outer_lr"],
            time_budget=args.budget,
            log_every=10_000,
        )
        mean, half = evaluate(task, result.x, episodes=args.episodes)
        row = {
            "method": name,
            "outer_steps": result.history[-1]["step"],
            "seconds": round(result.history[-1]["seconds"], 1),
            "test_accuracy": round(mean, 2),
            "ci95": round(half, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = ["| method | outer steps | seconds | test accuracy % (95% CI) |", "|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['outer_steps']} | {r['seconds']} | "
        f"{r['test_accuracy']} ± {r['ci95']} |"
        for r in rows
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
