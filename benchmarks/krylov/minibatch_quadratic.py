"""LancBiO's mini-batch behaviours at fixed x on a quadratic whose batches have different
Hessians (A_i = X_iᵀX_i/64 + I/2, 8 batches, |y| = 20, spectrum ~[0.5, 50]), against SOBA.

Prints, per configuration, the hypergradient's relative error averaged over the last 100 of
400 steps and the largest ‖v‖/‖v*‖ seen (v* = Ā⁻¹∇_y f of the mean problem). Not timed.
Run: PYTHONPATH=. python benchmarks/krylov/minibatch_quadratic.py
"""

from __future__ import annotations

import warnings

import torch

import bilevel as bl


def problem(n: int = 20, batches: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, 50**0.5, n, dtype=torch.float64)
    xs = [torch.randn(64, n, generator=g, dtype=torch.float64) * scales for _ in range(batches)]
    As = torch.stack([X.T @ X / 64 + 0.5 * torch.eye(n, dtype=torch.float64) for X in xs])
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    c, t = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    p = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - t) ** 2),
        lower=lambda x, y, i: 0.5 * y["y"] @ (As[i] @ y["y"]) - y["y"] @ (B @ x["x"] + c),
        lower_data=[torch.tensor(i) for i in range(batches)],
    )
    x = {"x": torch.randn(4, generator=g, dtype=torch.float64)}
    mean = As.mean(0)
    v_star = torch.linalg.solve(mean, torch.linalg.solve(mean, B @ x["x"] + c) - t)
    return p, x, {"y": torch.zeros(n, dtype=torch.float64)}, B.T @ v_star, v_star


def measure(name: str, steps: int = 400, **options) -> tuple[float, float]:
    p, x, y, exact, v_star = problem()
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
