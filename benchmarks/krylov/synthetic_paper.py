"""krylov_synthetic with the paper's metric beside ours, ≥ 3 seeds, budgets in outer steps.

The paper's metric (the authors' SyntheticProblem code, issue 16): at a logged step, run 500
more GD steps on y (step θ = the method's inner_lr) and 50 CG steps on ∇²_yy g v = ∇_y f started
from the method's own v (zero for methods without one), then report
‖∇_x f − ∇²_xy g · v‖ ("paper_hypergrad_norm"). Ours (the task's callbacks) is the relative
error of the method's estimate against the exact ∇F (Newton + dense solve).

Timed: run alone on the machine (the lead runs it). Smoke test:
  PYTHONPATH=. python benchmarks/krylov/synthetic_paper.py --steps 3 --seeds 1 --n 50 --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/krylov/synthetic_paper")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
