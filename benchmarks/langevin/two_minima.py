"""Two inner minima over a whole outer run: does the answer depend on where the inner loop starts?

    python benchmarks/langevin/two_minima.py --steps 500 --seeds 10

The toy (float64, x and y scalars; the unit test's problem with an outer regulariser):

    g(x, y) = (y² − 1)² + x·y          two minima near y = ±1 while |x| < 8/(3√3) ≈ 1.54
    f(x, y) = ½(y − 1)² + ½·x²         0 at the +1 minimum, about 2 at the −1 minimum

The optimistic answer is x ≈ 0 with y at +1 (f = 0). A method that trusts one inner minimum
keeps the basin its start is in: from the −1 basin its hypergradient pulls x only to about
−0.25, where that basin still exists, and f stays near 2. Seed s draws y₀ uniformly in
[−1.5, 1.5] (and sgld's noise); the same y₀ for every method of that seed. Every method runs
K inner steps of ``inner_lr`` per outer step, warm-started, then outer Adam for ``steps``.

Per run: the final x; the **realised upper loss** — f(x, y) at the deterministic methods' y,
and for sgld the mean of f over its final chain states (what deploying a sample of the chain
costs on average); the share of those states in the +1 basin; F_τ(x) = E f under the Gibbs law
exp(−g/τ) by quadrature (sgld's own objective); CPU seconds and oracle calls. A run **fails**
when its realised loss is above 1 (it ended in, or mostly in, the worse basin).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

import bilevel as bl
from bilevel.tree import Tree

DT = torch.float64
FAILURE_LOSS = 1.0
# label -> (method, options beyond the shared inner settings)
VARIANTS = {
    "itd": ("itd", {}),
    "cg": ("cg", {}),
    "sgld τ=0.5": ("sgld", {"temperature": 0.5}),
    "sgld τ=0.1": ("sgld", {"temperature": 0.1}),
}
SGLD_CHAINS = 32


def upper(x: Tree, y: Tree) -> Tensor:
    """f(x, y) = ½(y − 1)² + ½x², summed over chains when y holds several."""
    return 0.5 * torch.sum((y["y"] - 1) ** 2) + 0.5 * torch.sum(x["x"] ** 2)


def lower(x: Tree, y: Tree) -> Tensor:
    """g(x, y) = (y² − 1)² + x·y."""
    return torch.sum((y["y"] ** 2 - 1) ** 2 + x["x"] * y["y"])


def gibbs_upper(x: float, tau: float) -> float:
    """F_τ(x) = E f(x, y) under p(y) ∝ exp(−g(x, y)/τ), by quadrature on [−3, 3]."""
    grid = torch.linspace(-3, 3, 20001, dtype=DT)
    log_weight = -((grid**2 - 1) ** 2 + x * grid) / tau
    weight = torch.softmax(log_weight, 0)
    return float(torch.sum(weight * 0.5 * (grid - 1) ** 2)) + 0.5 * x**2


def run(label: str, seed: int, steps: int, inner_steps: int, inner_lr: float,
        outer_lr: float) -> dict:  # fmt: skip
    name, options = VARIANTS[label]
    draw = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=DT)
    start_y = 3 * float(draw) - 1.5
    options = {"inner_steps": inner_steps, "inner_lr": inner_lr, **options}
    if name == "sgld":
        options.update(chains=SGLD_CHAINS, seed=seed)
    problem = bl.Problem(upper=lambda x, y, b: upper(x, y), lower=lambda x, y, b: lower(x, y))
    x0 = {"x": torch.zeros(1, dtype=DT)}
    y0 = {"y": torch.tensor([start_y], dtype=DT)}
    started = time.process_time()
    result = bl.solve(problem, x0, y0, bl.method(name, **options), steps=steps,
                      outer_optimizer="adam", outer_lr=outer_lr, seed=seed,
                      log_every=steps)  # fmt: skip
    seconds = time.process_time() - started
    x = float(result.x["x"])
    if name == "sgld":
        samples = result.state.chains["y"].reshape(-1)
        realised = float(torch.mean(0.5 * (samples - 1) ** 2)) + 0.5 * x**2
        plus_share = float(torch.mean((samples > 0).to(DT)))
    else:
        y = float(result.state.y["y"])
        realised = 0.5 * (y - 1) ** 2 + 0.5 * x**2
        plus_share = float(y > 0)
    return {
        "label": label, "seed": seed, "y0": start_y, "x": x, "realised_upper": realised,
        "plus_basin_share": plus_share, "gibbs_upper_tau0.5": gibbs_upper(x, 0.5),
        "cpu_seconds": seconds, "oracle_calls": int(sum(result.history[-1]["oracles"].values())),
        "failed": realised > FAILURE_LOSS,
    }  # fmt: skip


def table(runs: list[dict], steps: int) -> str:
    """Median [min, max] over seeds of each quantity, failures, CPU seconds, oracle calls."""
    lines = [
        f"After {steps} outer steps, {len({r['seed'] for r in runs})} seeds "
        f"({sum(r['y0'] < 0 for r in runs) // len(VARIANTS)} of them start in the −1 basin). "
        "Realised upper loss: f at the method's y (sgld: mean over its final chain states); "
        f"failure: realised loss > {FAILURE_LOSS}. Median [min, max] over seeds.",
        "",
        "| method | failures | realised f | final x | +1-basin share | F_0.5(x) | CPU s "
        "| oracle calls |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"

    for label in VARIANTS:
        mine = [r for r in runs if r["label"] == label]
        cells = [
            label,
            f"{sum(r['failed'] for r in mine)}/{len(mine)}",
            spread([r["realised_upper"] for r in mine]),
            spread([r["x"] for r in mine]),
            spread([r["plus_basin_share"] for r in mine]),
            spread([r["gibbs_upper_tau0.5"] for r in mine]),
            f"{statistics.median(r['cpu_seconds'] for r in mine):.2f}",
            str(int(statistics.median(r["oracle_calls"] for r in mine))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--inner-lr", type=float, default=0.02)
    parser.add_argument("--outer-lr", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/langevin/two_minima")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        for label in VARIANTS:
            runs.append(run(label, seed, args.steps, args.inner_steps, args.inner_lr,
                            args.outer_lr))  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (out / "table.md").write_text(table(runs, args.steps))
    print(table(runs, args.steps))


if __name__ == "__main__":
    main()
