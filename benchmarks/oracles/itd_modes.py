"""ITD's two ways to differentiate the unrolled loop: torch.func.grad over the loop, or
torch.autograd (inner gradients with ``create_graph``, one ``backward``). Same math, same
hypergradient; CPU seconds per outer step, median of interleaved rounds.

Problems: the peer benchmark's FashionMNIST hyper-cleaning (linear 785×10 model, 5k/5k, 10 GD
steps of 0.5) and the same with an MLP (784→300→10) inner model.

    python benchmarks/oracles/itd_modes.py [--rounds 3] [--steps 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.func import grad

import bilevel as bl
from bilevel import tree as tr
from bilevel.inner import run_inner
from bilevel.tasks.hyper_cleaning import hyper_cleaning


def func_itd(problem, method, x, y):
    """ITD as torch.func.grad over the whole unrolled loop (the library's earlier way)."""
    batch = problem.upper_batch()

    def outer(x_):
        y_k = run_inner(problem, x_, y, method.inner_steps, method.optimizer, mode="func")
        return problem.upper_value(x_, y_k, batch), tr.detach(y_k)

    with problem.unwatched():
        return grad(outer, has_aux=True)(x)


def autograd_itd(problem, method, x, y):
    state = bl.MethodState(y=y, y0=y)
    return method.step(problem, x, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for model in ("linear", "mlp"):
        task = hyper_cleaning(dataset="fashion_mnist", model=model, dtype=torch.float32)
        problem, x, y = task.problem, task.x0, task.y0
        method = bl.method("itd", inner_steps=10, inner_lr=0.5, warm_start=False)
        a = func_itd(problem, method, x, y)[0]
        b = autograd_itd(problem, method, x, y)[0]
        error = float(tr.norm(tr.sub(a, b)) / tr.norm(a))
        times = {"torch.func": [], "torch.autograd": []}
        for _ in range(args.rounds):
            for name, fn in (("torch.func", func_itd), ("torch.autograd", autograd_itd)):
                start = time.process_time()
                for _ in range(args.steps):
                    fn(problem, method, x, y)
                times[name].append((time.process_time() - start) / args.steps)
        results[model] = {
            "cpu_s_per_step": {k: statistics.median(v) for k, v in times.items()},
            "func_over_autograd": statistics.median(
                f / a for f, a in zip(times["torch.func"], times["torch.autograd"], strict=True)
            ),
            "relative_difference": error,
        }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
