"""Cost of an outer step on few_shot (feature form) relative to one upper reverse pass.

The upper gradient — a forward and a backward pass of the query loss through the conv features
— is needed by every method anyway, so it is the unit: an outer step that costs close to 1× of
it pays little beyond it. Both are measured in the same process, interleaved, in CPU seconds
(process time), so the ratio holds on any machine.

    python benchmarks/oracles/few_shot_step.py [--steps 10] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.func import grad

import bilevel as bl
from bilevel.tasks.few_shot import few_shot


def cpu_seconds(fn, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="esj,itd,cg")
    parser.add_argument("--steps", type=int, default=10, help="outer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = few_shot()
    problem, setup, x = task.problem, task.metadata["setup"], task.x0
    problem.next_task()
    episode = problem.current_task
    heads = setup.init_lower(x)

    def upper_pass() -> None:
        grad(lambda x_: setup.head_upper(setup.query_features(x_, episode), heads, episode))(x)

    methods = {}
    for name in args.methods.split(","):
        method = bl.method(name, **task.method_options(name))
        methods[name] = (method, method.init(problem, x, None))

    def outer_step(name: str) -> None:
        method, state = methods[name]
        problem.next_task()
        hg, state = method.step(problem, x, state)
        problem.raise_if_nonfinite(0)
        methods[name] = (method, state)

    for name in methods:  # warm-up: lazy initialisation, allocator
        outer_step(name)
    upper_pass()
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    units = []
    for _ in range(args.rounds):
        unit = cpu_seconds(upper_pass, args.steps)
        units.append(unit)
        for name in methods:
            step = cpu_seconds(lambda name=name: outer_step(name), args.steps)
            seconds[name].append(step)
            ratios[name].append(step / unit)
    result = {
        "upper_pass_cpu_s": statistics.median(units),
        "methods": {
            name: {
                "cpu_s_per_step": statistics.median(seconds[name]),
                "ratio_to_upper_pass": statistics.median(ratios[name]),
                "options": task.method_options(name),
            }
            for name in methods
        },
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
