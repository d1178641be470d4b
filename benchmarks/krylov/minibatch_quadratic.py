"""LancBiO's mini-batch behaviours at fixed x on a quadratic whose batches have different
Hessians (A_i = X_iᵀX_i/64 + I/2, 8 batches, |y| = 20, spectrum ~[0.5, 50]), against SOBA.

Prints, per configuration, the hypergradient's relative error averaged over the last 100 of
400 steps and the largest ‖v‖/‖v*‖ seen (v* = Ā⁻¹∇_y f of the mean problem), then the floor of
any method that solves one batch's system exactly per cycle: the error of v_i = A_i⁻¹∇_y f at
the mean problem's y*, per batch and for the mean of the v_i. Not timed.
Run: PYTHONPATH=. python benchmarks/krylov/minibatch_quadratic.py
"""

from __future__ import annotations

import warnings

import torch
from torch.func import hessian, jacrev

import bilevel as bl
from bilevel.tasks.minibatch_quadratic import minibatch_quadratic


def measure(name: str, steps: int = 400, **options) -> tuple[float, float]:
    p, x, y, v_star, exact = minibatch_quadratic()
    method = bl.method(name, inner_steps=1, inner_lr=0.02, **options)
    state, errors, largest = method.init(p, x, y), [], 0.0
    for _ in range(steps):
        hg, state = method.step(p, x, state)
        errors.append(float((hg["x"] - exact).norm() / exact.norm()))
        largest = max(largest, float(state.v["y"].norm() / v_star.norm()))
    return sum(errors[-100:]) / 100, largest


def one_batch_floor() -> tuple[list[float], float]:
    """Relative hypergradient errors of the exact one-batch solves v_i = A_i⁻¹ b, b = Ā v*
    (= y* − t), and of their mean: what a cycle that solves batch i's system exactly returns
    at y* (A_i and the mixed term read from the problem by torch.func)."""
    p, x, _, v_star, exact = minibatch_quadratic()
    y = {"y": torch.zeros_like(v_star)}
    hessians = [hessian(lambda y_, i=i: p.lower(x, {"y": y_}, i))(y["y"]) for i in p.lower_data]
    b = torch.stack(hessians).mean(0) @ v_star
    # hg = −∇²_xy g · v; ∇_y g is affine in x with the same slope for every batch
    slope = jacrev(lambda x_: jacrev(lambda y_: p.lower({"x": x_}, {"y": y_}, 0))(y["y"]))(x["x"])
    solves = [torch.linalg.solve(a, b) for a in hessians]
    error = lambda v: float((-slope.T @ v - exact).norm() / exact.norm())  # noqa: E731
    return [error(v) for v in solves], error(torch.stack(solves).mean(0))


CONFIGS = {
    "soba (η = 0.02)": ("soba", {"solver_lr": 0.02}),
    "lancbio default (restart, hold_batch)": ("lancbio", {}),
    "lancbio restart, batch per step": ("lancbio", {"hold_batch": False}),
    "lancbio window='authors' m=30, batch per step": (
        "lancbio", {"window": "authors", "m": 30, "m_max": 30, "hold_batch": False}),
    "lancbio window='authors' m=30, hold_batch": (
        "lancbio", {"window": "authors", "m": 30, "m_max": 30}),
}  # fmt: skip

if __name__ == "__main__":
    warnings.simplefilter("ignore", RuntimeWarning)
    print("| configuration | mean rel. error, last 100 of 400 steps | max ‖v‖/‖v*‖ |")
    print("|---|---|---|")
    for label, (name, options) in CONFIGS.items():
        error, largest = measure(name, **options)
        print(f"| {label} | {error:.3g} | {largest:.3g} |")
    per_batch, of_mean = one_batch_floor()
    print(
        f"\nexact one-batch solves at y*: rel. error per batch {min(per_batch):.3g}–"
        f"{max(per_batch):.3g} (mean {sum(per_batch) / len(per_batch):.3g}); "
        f"of their mean {of_mean:.3g}"
    )
