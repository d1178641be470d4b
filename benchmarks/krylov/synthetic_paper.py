"""krylov_synthetic with the paper's metric beside ours, ≥ 3 seeds, budgets in outer steps.

The paper's metric (the authors' SyntheticProblem code, issue 16): at a logged step, run 500
more GD steps on y (step θ = the method's inner_lr) and 50 CG steps on ∇²_yy g v = ∇_y f started
from the method's own v (zero for methods without one), then report
‖∇_x f − ∇²_xy g · v‖ ("paper_hypergrad_norm"). Ours (the task's callbacks) is the relative
error of the method's estimate against the exact ∇F (Newton + dense solve).

Writes one JSON history per run and ``table.md`` (medians over seeds of the paper's metric and
the true ‖∇F‖ at step marks and at CPU-second marks; ``--table-only`` rewrites it from the JSON
files). Timed: run alone on the machine. Smoke test:
  PYTHONPATH=. python benchmarks/krylov/synthetic_paper.py --steps 3 --seeds 1 --n 50 --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import bilevel as bl
from bilevel import linalg
from bilevel import tree as tr
from bilevel.solve import StepContext

# the paper's per-method settings (their main.py): SOBA T = 1, stocBiO T = Q = 10, LancBiO T = 5
# with m = 1 ×1.1 every 20 steps up to 80 (the task's defaults), AmIGO-CG 5 CG steps
METHODS = {
    "lancbio": {},
    "lancbio_modulo": {"restart_rule": "modulo"},  # the authors' restart timing
    "subbio": {},
    "soba": {"inner_steps": 1},
    "amigo": {},
    "stocbio": {"inner_steps": 10, "solver_iters": 10},
}


def paper_metric(problem: bl.Problem, inner_lr: float):
    def callback(ctx: StepContext) -> dict[str, float]:
        x = tr.detach(ctx.x)
        with problem.uncounted(), problem.unwatched():
            y = tr.detach(ctx.state.y)
            for _ in range(500):
                y = tr.axpy(-inner_lr, problem.grad_lower_y(x, y), y)
            gx, gy = problem.grad_upper(x, y)
            v0 = getattr(ctx.state, "v", None)
            v, _ = linalg.conjugate_gradient(
                lambda t: problem.hvp_lower_yy(x, y, t), gy, v0, 50, tol=0.0
            )
            hg = tr.sub(gx, problem.mixed_lower_xy(x, y, v))
        return {"paper_hypergrad_norm": float(tr.norm(hg))}

    return callback


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3g}" if values else "–"


def write_table(out: Path, step_marks: list[int], cpu_marks: list[float]) -> str:
    """table.md: per method, medians over seeds of the paper's ‖∇φ‖ and of the true ‖∇F(x)‖
    (the task's ``grad_norm``, exact) at logged steps and at the last log within each CPU-second
    mark (method time, the callbacks excluded), our relative hypergradient error at the last
    step, and CPU seconds and HVPs per outer step."""
    runs: dict[str, list[list[dict]]] = {}
    for path in sorted(out.glob("*-s*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["method"], []).append(record["history"])

    def pair(rows: list[dict]) -> str:
        paper = _median([r["paper_hypergrad_norm"] for r in rows])
        return f"{paper} / {_median([r['grad_norm'] for r in rows])}"

    head = ["method", "seeds"]
    head += [f"‖∇φ‖ / ‖∇F‖, step {k}" for k in step_marks]
    head += [f"‖∇φ‖ / ‖∇F‖, {c:g} CPU s" for c in cpu_marks]
    head += ["our error, last step", "CPU s / step", "HVPs / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, histories in runs.items():
        cells = [label, str(len(histories))]
        for k in step_marks:
            cells.append(pair([r for h in histories for r in h if r["step"] == k]))
        for c in cpu_marks:
            within = [[r for r in h if r["cpu_seconds"] <= c] for h in histories]
            cells.append(pair([w[-1] for w in within if w]))
        last = [h[-1] for h in histories]
        cells.append(_median([r["hypergrad_error"] for r in last if "hypergrad_error" in r]))
        cells.append(_median([r["cpu_seconds"] / r["step"] for r in last]))
        cells.append(_median([r["oracles"].get("hvp", 0) / r["step"] for r in last]))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/krylov/synthetic_paper")
    parser.add_argument("--step-marks", default="100,500,1000")
    parser.add_argument("--cpu-marks", default="5,10,20")
    parser.add_argument("--table-only", action="store_true", help="rewrite table.md only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step_marks = [int(k) for k in args.step_marks.split(",")]
    cpu_marks = [float(c) for c in args.cpu_marks.split(",")]
    if args.table_only:
        print(write_table(out, step_marks, cpu_marks))
        return
    for label in args.methods.split(","):
        name = label.split("_")[0]
        for seed in range(args.seeds):
            task = bl.tasks.make("krylov_synthetic", n=args.n, seed=seed, reference_every=1)
            options = task.method_options(name, **METHODS[label])
            method = bl.method(name, **options)
            callbacks = [*task.callbacks, paper_metric(task.problem, options["inner_lr"])]
            result = bl.solve(task.problem, task.x0, task.y0, method, steps=args.steps,
                              outer_optimizer="sgd", outer_lr=1.0, seed=seed,
                              log_every=args.log_every, callbacks=callbacks)  # fmt: skip
            path = out / f"{label}-s{seed}.json"
            path.write_text(json.dumps({"method": label, "options": {k: str(v) for k, v in
                                        options.items()}, "seed": seed, "n": args.n,
                                        "history": result.history}, indent=1))  # fmt: skip
            last = result.history[-1]
            print(f"{label} seed {seed}: step {last['step']} paper ‖∇φ‖ "
                  f"{last['paper_hypergrad_norm']:.3g}  our error "
                  f"{last.get('hypergrad_error', float('nan')):.3g}", flush=True)  # fmt: skip
    print(write_table(out, step_marks, cpu_marks))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
