"""``bl.check``: are the hypergradient methods right on *your* problem?

Every method estimates the gradient of the K-step objective F_K(x) = f(x, y_K(x)), y_K the
K-th iterate of the inner optimizer from y (exactly for ``itd`` and ``forward``, approximately
for implicit, stochastic and biased methods). :func:`check` compares each method's estimate
with central finite differences of F_K (along a few random directions, or every coordinate
of a small x) and with each other, and gives a pass/fail verdict per method against a
tolerance. :func:`check_quadratic` is ``bilevel check``: every registered method against
the closed-form hypergradient of a random quadratic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import GradientDescent, run_inner
from bilevel.methods.base import Method
from bilevel.methods.base import method as make_method
from bilevel.problem import Problem, validate
from bilevel.solve import hypergrad
from bilevel.tree import Tree

MethodSpec = str | Method


@dataclass
class MethodCheck:
    """One method's verdict: relative ``error`` against the reference (finite differences or a
    closed form) and whether it is within ``tol``; ``failure`` holds the error message when the
    method raised instead."""

    name: str
    error: float
    tol: float
    passed: bool
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    failure: str | None = None


@dataclass
class CheckReport:
    """What :func:`check` found: a :class:`MethodCheck` per method, the pairwise relative
    differences between methods' estimates (``agreement[a, b]``) and how the reference was
    computed. ``str(report)`` is a readable table; ``report.passed`` is every verdict."""

    results: list[MethodCheck]
    agreement: dict[tuple[str, str], float]
    reference: str

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __getitem__(self, name: str) -> MethodCheck:
        for r in self.results:
            if r.name == name:
                return r
        names = [r.name for r in self.results]
        raise KeyError(f"no method {name!r} in this report; it has {names}")

    def __str__(self) -> str:
        width = max(11, *(len(r.name) for r in self.results))
        lines = [
            self.reference,
            f"| {'method':{width}s} | verdict | rel. error | tolerance | seconds | oracle counts |",
            f"|{'-' * (width + 2)}|---------|------------|-----------|---------|---------------|",
        ]
        for r in self.results:
            verdict = "pass" if r.passed else "FAIL"
            detail = r.failure or ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items()))
            lines.append(
                f"| {r.name:{width}s} | {verdict:7s} | {r.error:10.2e} | {r.tol:9.1e} | "
                f"{r.seconds:7.2f} | {detail} |"
            )
        if len(self.results) > 1:
            worst = max(self.agreement.items(), key=lambda kv: _nan_last(kv[1]))
            (a, b), value = worst
            lines.append(f"largest disagreement between methods: {a} vs {b}, {value:.2e}")
        lines.append(f"{'all pass' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def check(
    problem: Problem,
    x: Tree,
    y: Tree | None,
    methods: Iterable[MethodSpec] | Mapping[str, MethodSpec] = ("itd", "forward", "cg"),
    inner_steps: int = 100,
    inner_lr: float = 0.1,
    tol: float | Mapping[str, float] = 1e-6,
    directions: int = 8,
    full_up_to: int = 16,
    steps: int | Mapping[str, int] = 1,
    reference: Tree | None = None,
    seed: int = 0,
) -> CheckReport:
    """Compare hypergradient methods on ``problem`` at ``x`` (inner start ``y``).

    Args:
        methods: names (built with ``inner_steps`` and ``inner_lr``), :class:`Method`
            instances (used as given: that is how to check your own options), or a mapping
            label -> name or instance.
        inner_steps, inner_lr: K and the plain gradient-descent step of the objective F_K that
            finite differences differentiate.
        tol: relative error allowed, one number or per-method (by label; others get 1e-6).
        directions: random unit directions u for the central differences
            (F_K(x + h u) − F_K(x − h u)) / 2h, compared with ⟨hg, u⟩; when x has at most
            ``full_up_to`` entries, every coordinate is used instead (the full gradient).
        steps: method steps at fixed x before reading the estimate (more for methods that
            refine across steps: lancbio, subbio, soba), one number or per-method.
        reference: an exact hypergradient to compare with instead of finite differences.
        seed: seed of the random directions.

    The problem must be deterministic (no ``upper_data``, ``lower_data`` or ``task_data``):
    differences of a stochastic objective measure its noise. Use float64 x, y and data for
    a tight check: the difference step is ε^(1/3)-scaled, error ~1e-10 in float64 but ~1e-4
    in float32.
    """
    if any(d is not None for d in (problem.upper_data, problem.lower_data, problem.task_data)):
        raise ValueError(
            "check needs a deterministic problem (no upper_data, lower_data or task_data): "
            "build one on a fixed batch"
        )
    check_int("inner_steps", inner_steps, 0)
    check_positive("inner_lr", inner_lr)
    check_int("directions", directions, 1)
    x, y = validate(problem, x, y)
    x, y = tr.clone(x), None if y is None else tr.clone(y)
    chosen = _labelled(methods, inner_steps, inner_lr)
    if reference is None:
        basis, target, how = _finite_differences(
            problem, x, y, inner_steps, inner_lr, directions, full_up_to, seed
        )
    else:
        reference = tr.check_tree(reference, "reference")
        basis = torch.eye(tr.size(x), dtype=_dtype(x), device=tr.device(x))
        target, how = tr.flatten(reference).to(basis.dtype), "the given reference hypergradient"
    results, estimates = [], {}
    for label, method in chosen.items():
        limit = tol.get(label, 1e-6) if isinstance(tol, Mapping) else tol
        results.append(_run(problem, x, y, label, method, _per(steps, label), basis, target,
                            limit, estimates))  # fmt: skip
    agreement = {
        (a, b): _relative(estimates[a], estimates[b])
        for i, a in enumerate(estimates)
        for b in list(estimates)[i + 1 :]
    }
    return CheckReport(results=results, agreement=agreement, reference=how)


def check_quadratic(
    dim_x: int = 5, dim_y: int = 20, condition: float = 10.0, seed: int = 0
) -> CheckReport:
    """``bilevel check``: every registered method, with the options and tolerances of
    :data:`QUADRATIC_CHECK`, against the closed-form hypergradient of a random float64
    quadratic (K large enough that F_K ≈ F)."""
    from bilevel.methods.base import methods_available
    from bilevel.tasks.quadratic import quadratic

    missing = sorted(set(methods_available()) - set(QUADRATIC_CHECK))
    if missing:
        raise ValueError(f"QUADRATIC_CHECK has no entry for method(s) {', '.join(missing)}")
    task = quadratic(dim_x=dim_x, dim_y=dim_y, condition=condition, seed=seed)
    exact = task.metadata["data"].hypergradient(task.x0)
    chosen = {name: make_method(name, **spec["options"]) for name, spec in QUADRATIC_CHECK.items()}
    report = check(
        task.problem,
        task.x0,
        task.y0,
        chosen,
        tol={name: spec["tol"] for name, spec in QUADRATIC_CHECK.items()},
        steps={name: spec.get("steps", 1) for name, spec in QUADRATIC_CHECK.items()},
        reference=exact,
    )
    report.reference = (
        f"random quadratic: dim_x={dim_x} dim_y={dim_y} condition={condition:g} seed={seed} "
        f"(float64, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        "against the closed-form hypergradient"
    )
    return report


_EXACT = {"inner_steps": 300, "inner_lr": 1.0}
# `bilevel check`'s options per method, its outer steps at fixed x (methods that refine their
# estimate across steps) and its tolerance: exact methods to near machine precision; bda, the
# ES estimators and sgld are biased (bda's f-term at finite K), noisy (Q = 1024 seeded
# directions) or at a temperature > 0, so their tolerance is about twice their measured error
# (bda 4e-2, ES 7e-2, sgld 5e-3 with torch 2.13): a regression check, not a proof.
QUADRATIC_CHECK: dict[str, dict[str, Any]] = {
    "itd": {"options": _EXACT, "tol": 1e-8},
    "forward": {"options": _EXACT, "tol": 1e-8},
    "cg": {"options": {**_EXACT, "solver_iters": 50, "solver_tol": 1e-12}, "tol": 1e-8},
    "neumann": {"options": {**_EXACT, "solver_iters": 300, "solver_lr": 1.0}, "tol": 1e-8},
    "fixed_point": {"options": {**_EXACT, "solver_iters": 300, "solver_lr": 1.0}, "tol": 1e-8},
    "stocbio": {"options": {**_EXACT, "solver_iters": 300, "solver_lr": 1.0}, "tol": 1e-8},
    "amigo": {"options": {**_EXACT, "solver_iters": 50}, "tol": 1e-8},
    "lancbio": {"options": {"inner_steps": 100, "inner_lr": 1.0, "fallback_lr": 1.0},
                "steps": 30, "tol": 1e-6},  # fmt: skip
    "subbio": {"options": {"inner_steps": 50, "inner_lr": 1.0, "solver_lr": 1.0},
               "steps": 100, "tol": 2e-6},  # fmt: skip
    "soba": {"options": {"inner_steps": 1, "inner_lr": 1.0, "solver_lr": 1.0},
             "steps": 300, "tol": 1e-6},  # fmt: skip
    "bda": {"options": {**_EXACT, "mu": 0.5}, "tol": 0.1},
    "esj": {"options": {**_EXACT, "directions": 1024, "radius": 1e-4, "antithetic": True,
                      "seed": 0},
            "tol": 0.15},  # fmt: skip
    "esj_s": {"options": {**_EXACT, "directions": 1024, "radius": 1e-4, "antithetic": True,
                      "seed": 0},
              "tol": 0.15},  # fmt: skip
    "hozog": {"options": {**_EXACT, "directions": 1024, "radius": 1e-4, "antithetic": True,
                      "seed": 0},
              "tol": 0.15},  # fmt: skip
    "sgld": {"options": {"inner_steps": 2000, "inner_lr": 0.1, "temperature": 1e-6,
                         "burn_in": 300, "seed": 0}, "tol": 0.02},  # fmt: skip
    # F2SA: bias O(1/λ) at a fixed λ; BOME: the x-part of its joint (x, y) descent direction,
    # not an estimate of ∇F, so its tolerance only bounds how far the two differ here
    "f2sa": {"options": {**_EXACT, "lam": 1e4, "lam_growth": 0.0}, "tol": 1e-2},
    "bome": {"options": _EXACT, "tol": 1.0},
    # the ES ablation: ∇_x f alone, the indirect term dropped; its error is that term's size
    "direct": {"options": _EXACT, "tol": 1.0},
}


def _labelled(methods: Any, inner_steps: int, inner_lr: float) -> dict[str, Method]:
    items = methods.items() if isinstance(methods, Mapping) else ((None, m) for m in methods)
    out: dict[str, Method] = {}
    for label, spec in items:
        if isinstance(spec, str):
            built = make_method(spec, inner_steps=inner_steps, inner_lr=inner_lr)
        elif isinstance(spec, Method):
            built = spec
        else:
            raise TypeError(f"methods must be names or Method instances, got {spec!r}")
        label = label or built.name
        if label in out:
            raise ValueError(f"method {label!r} given twice: pass a mapping label -> method")
        out[label] = built
    if not out:
        raise ValueError("check needs at least one method")
    return out


def _finite_differences(
    problem: Problem,
    x: Tree,
    y: Tree | None,
    inner_steps: int,
    inner_lr: float,
    directions: int,
    full_up_to: int,
    seed: int,
) -> tuple[Tensor, Tensor, str]:
    """Directions (rows) and the central differences of F_K along them."""

    dtype, device = _dtype(x), tr.device(x)
    n = tr.size(x)
    if n <= full_up_to:
        basis = torch.eye(n, dtype=dtype, device=device)
        what = f"every coordinate of x ({n})"
    else:
        gen = torch.Generator().manual_seed(seed)
        basis = torch.randn(directions, n, generator=gen, dtype=torch.float64).to(dtype)
        basis = basis.to(device) / torch.linalg.norm(basis, dim=1, keepdim=True).to(device)
        what = f"{directions} random directions"
    optimizer = GradientDescent(inner_lr)
    flat = tr.flatten(x)
    h = torch.finfo(dtype).eps ** (1 / 3) * max(1.0, float(torch.linalg.norm(flat)))

    def objective(point: Tensor) -> Tensor:
        xs = tr.unflatten(point, x)
        y_k = run_inner(problem, xs, problem.initial_y(xs, y), inner_steps, optimizer)
        return problem.upper_value(xs, y_k)

    with problem.uncounted(), problem.unwatched(), torch.no_grad():
        values = [(objective(flat + h * u) - objective(flat - h * u)) / (2 * h) for u in basis]
    how = (
        f"central differences (h={h:.1e}, {dtype}) of F_K(x) = f(x, y_K(x)), K={inner_steps} "
        f"gradient steps of {inner_lr:g}, along {what}"
    )
    return basis, torch.stack(values), how


def _run(
    problem: Problem,
    x: Tree,
    y: Tree | None,
    label: str,
    method: Method,
    steps: int,
    basis: Tensor,
    target: Tensor,
    tol: float,
    estimates: dict[str, Tensor],
) -> MethodCheck:

    before = dict(problem.counts)
    start = time.perf_counter()
    try:
        hg = hypergrad(problem, x, y, method, steps=steps)
    except (ValueError, TypeError, RuntimeError, FloatingPointError) as err:
        message = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        return MethodCheck(label, math.nan, tol, False, time.perf_counter() - start,
                           failure=f"raised: {message}")  # fmt: skip
    seconds = time.perf_counter() - start
    counts = {k: v - before.get(k, 0) for k, v in problem.counts.items() if v - before.get(k, 0)}
    estimate = basis @ tr.flatten(hg).to(basis.dtype)
    estimates[label] = estimate
    error = _relative(estimate, target)
    return MethodCheck(label, error, tol, bool(error <= tol), seconds, counts)


def _relative(a: Tensor, b: Tensor) -> float:
    scale = float(torch.linalg.norm(b))
    diff = float(torch.linalg.norm(a - b))
    return diff / scale if scale > 0 else diff


def _per(value: int | Mapping[str, int], label: str) -> int:
    return value.get(label, 1) if isinstance(value, Mapping) else value


def _dtype(x: Tree) -> torch.dtype:
    return next(iter(x.values())).dtype


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value
