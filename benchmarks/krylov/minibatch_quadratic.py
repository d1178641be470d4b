"""LancBiO's mini-batch behaviours at fixed x on a quadratic whose batches have different
Hessians (A_i = X_iᵀX_i/64 + I/2, 8 batches, |y| = 20, spectrum ~[0.5, 50]), against SOBA.

Prints, per configuration, the hypergradient's relative error averaged over the last 100 of
400 steps and the largest ‖v‖/‖v*‖ seen (v* = Ā⁻¹∇_y f of the mean problem), then the floor of
any method that solves one batch's system exactly per cycle: the error of v_i = A_i⁻¹∇_y f at
the mean problem's y*, per batch and for the mean of the v_i (the task's ``one_batch_floor``).
Not timed.
Run: PYTHONPATH=. python benchmarks/krylov/minibatch_quadratic.py
"""

from __future__ import annotations

import warnings

import bilevel as bl
from bilevel.tasks.minibatch_quadratic import minibatch_quadratic, one_batch_floor


def measure(name: str, steps: int = 400, **options) -> tuple[float, float]:
    p, x, y, v_star, exact = minibatch_quadratic()
    method = bl.method(name, inner_steps=1, inner_lr=0.02, **options)
    state, errors, largest = method.init(p, x, y), [], 0.0
    for _ in range(steps):
        hg, state = method.step(p, x, state)
        errors.append(float((hg["x"] - exact).norm() / exact.norm()))
        largest = max(largest, float(state.v["y"].norm() / v_star.norm()))
    return sum(errors[-100:]) / 100, largest


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
