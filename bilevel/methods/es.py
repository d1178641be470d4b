"""Hessian-free hypergradients by evolution strategies: ESJ, ESJ-S and the HOZOG baseline.

ESJ keeps ∇_x f and ∇_y f exact and estimates only the response Jacobian J = dy_N/dx, by finite
differences of whole inner trajectories run from the same start at randomly perturbed x:

    δ_q = (y_N(x + μ u_q) − y_N(x)) / μ,       hg = ∇_x f(x, y_N) + (1/Q) Σ_q ⟨δ_q, ∇_y f⟩ · u_q

No Hessian-vector or mixed products and no autograd graph through the inner loop: memory does
not grow with the number of inner steps N. Sow, Ji, Liang, "ES-Based Jacobian Enables Faster
Bilevel Optimization", arXiv 2110.07004 (PZOBO / PZOBO-S in the NeurIPS 2022 version).
HOZOG (Gu, Huo, Huang, "Optimizing Large-Scale Hyperparameters via Automated Learning
Algorithm", arXiv 1808.09617) estimates the whole hypergradient by zeroth order instead:
hg = (1/Q) Σ_q (F_N(x + μ u_q) − F_N(x)) / μ · u_q.

Direction q of outer step t is drawn from a generator seeded by (the run's seed, t, q) only, so
any subset of directions can be computed apart and summed: under torch.distributed each rank
runs :meth:`Perturbed.partial_estimate` on its share of ``range(directions)`` and one
all-reduce sums the shares (see :mod:`bilevel.distributed`). The run's seed is the ``seed``
option, or (``seed=None``, the default) one drawn from torch's global RNG at ``init`` — which
``bl.solve(seed=...)`` seeds, so runs with different seeds draw different directions and
repeated ``bl.hypergrad`` calls are independent estimates. It is kept in the state (a resumed
run continues the same directions) and broadcast from rank 0 (every rank uses the same).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import Adam, GradientDescent, Momentum
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree

DISTRIBUTIONS = ("gaussian", "sphere_per_tensor")
# optimizers whose update acts entry by entry, so one update on stacked paths is exact
_ELEMENTWISE = (GradientDescent, Momentum, Adam)


def direction_seed(seed: int, step: int, q: int) -> int:
    """Seed of direction ``q`` at outer step ``step``: a hash of the triple, the same in every
    process (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{q}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in a signed int64


def draw_direction(like: Tree, seed: int, step: int, q: int, distribution: str) -> Tree:
    """Direction ``q`` of outer step ``step``, a tree like ``like`` (dtype and device kept).

    ``gaussian``: u ~ N(0, I), so E[u uᵀ] = I. ``sphere_per_tensor``: every leaf gets its own
    unit-norm direction (the authors' code), so E[u uᵀ] = blockdiag(I/d_i) with d_i the leaf
    size: the indirect term of leaf i is shrunk by 1/d_i in expectation.
    """
    device = tr.device(like)
    gen = torch.Generator(device=device).manual_seed(direction_seed(seed, step, q))
    u = tr.randn_like(like, generator=gen)
    if distribution == "sphere_per_tensor":
        u = {k: v / torch.linalg.vector_norm(v) for k, v in u.items()}
    return u


def draw_directions(like: Tree, seed: int, step: int, qs: range, distribution: str) -> Tree:
    """Directions ``qs`` of outer step ``step`` stacked along a new leading dim."""
    us = [draw_direction(like, seed, step, q, distribution) for q in qs]
    if not us:  # an empty share (more ranks than directions)
        return {k: v.new_empty((0, *v.shape)) for k, v in like.items()}
    return {k: torch.stack([u[k] for u in us]) for k in like}


class Partial(NamedTuple):
    """One share of an estimate: ``hg = base + total / directions``, ``total`` summed over the
    shares of ``range(directions)``; ``y`` is the unperturbed y_N (the same in every share)."""

    base: Tree
    total: Tree
    y: Tree


class Paths(NamedTuple):
    """The trajectories of one step: unperturbed y_N(x), the perturbed x and y_N stacked over
    paths (``+u_q`` for q in the share, then ``−u_q`` when antithetic), and the directions u."""

    y: Tree
    xs: Tree
    ys: Tree
    u: Tree


@dataclass
class ESState(MethodState):
    """Adds the outer-step counter ``t`` and the run's direction seed ``seed`` (together they
    seed the directions, so both are checkpointed) and ``batched``, the path mode chosen by
    ``batched="auto"`` at the first step."""

    t: int = 0
    seed: int = 0
    batched: bool | None = None


@dataclass(kw_only=True)
class Perturbed(Method):
    """Shared machinery: directions, and the unperturbed plus perturbed inner trajectories.

    Options:
        directions: Q, random directions per outer step (the paper uses 1).
        radius: finite-difference radius μ (``mu`` is BDA's aggregation weight, a different thing).
        distribution: ``gaussian`` (default) or ``sphere_per_tensor`` (biased, see
            :func:`draw_direction`).
        antithetic: use ± pairs, (y_N(x + μu) − y_N(x − μu)) / 2μ: the O(μ) term of the
            difference cancels; costs 2Q perturbed paths instead of Q.
        seed: seeds the directions together with the step counter and the direction index;
            ``None`` (default) draws it from torch's global RNG at ``init``, so
            ``bl.solve(seed=...)`` varies the directions and every ``init`` is a fresh draw.
        batched: ``True`` runs the perturbed paths with one ``vmap`` per inner step, ``False``
            loops over them, ``"auto"`` tries ``vmap`` at the first step and falls back to the
            loop if the losses cannot be vmapped (or the inner optimizer is not one of the
            built-in element-wise ones, whose update is applied to the stacked paths at once).
    """

    directions: int = 1
    radius: float = 0.01
    distribution: str = "gaussian"
    antithetic: bool = False
    seed: int | None = None
    batched: bool | str = "auto"
    RENAMED = {"mu": "radius"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("directions", self.directions, 1)
        check_positive("radius", self.radius)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}"
            )
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic must be True or False, got {self.antithetic!r}")
        if self.batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {self.batched!r}")

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ESState:
        base = super().init(problem, x, y)
        batched = None if self.batched == "auto" else bool(self.batched)
        if batched is None and not isinstance(self.optimizer, _ELEMENTWISE):
            batched = False
        if batched is None and problem.reduce is not None:
            batched = False  # the oracles' all-reduce cannot run under vmap
        if not self.shares_batches:
            batched = False
        return ESState(y=base.y, y0=base.y0, seed=self._run_seed(x), batched=batched)

    def _run_seed(self, x: Tree) -> int:
        """The ``seed`` option, else a draw from torch's global RNG; rank 0's under
        torch.distributed (one host read at ``init``, none per step)."""
        if self.seed is not None:
            return self.seed
        return distributed.shared_seed(tr.device(x))

    def step(self, problem: Problem, x: Tree, state: ESState) -> tuple[Tree, ESState]:
        # under torch.distributed each rank runs its share of the directions and one all-reduce
        # sums them; not when ranks split tasks or batches (they then need every direction)
        split = problem.reduce is None and problem.combine is None
        qs = distributed.shard(self.directions) if split else range(self.directions)
        part = self.partial_estimate(problem, x, state, qs)
        total = distributed.all_reduce_sum(part.total) if split else part.total
        hg = tr.axpy(1.0 / self.directions, total, part.base)
        state.y = part.y
        state.t += 1
        return hg, state

    def partial_estimate(self, problem: Problem, x: Tree, state: ESState, qs: range) -> Partial:
        """The estimate's share from directions ``qs`` at step ``state.t`` (the state is not
        advanced: :meth:`step` does that once the shares are summed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ paths
    @property
    def shares_batches(self) -> bool:
        """Whether every inner batch feeds all paths (always, except ``esj_s`` on request)."""
        return True

    def run_paths(self, problem: Problem, x: Tree, state: ESState, qs: range) -> Paths:
        """The unperturbed and the perturbed trajectories for directions ``qs``.

        Every inner step draws one lower batch and applies it to all paths (common random
        numbers). Each perturbed path runs all its steps in one call (one ``vmap`` over the
        paths, or a loop), so a declared lower representation is computed once per perturbed
        x. The unperturbed path costs N counted inner gradients, the P perturbed ones P·N more
        (counted in bulk).
        """
        x = tr.detach(x)
        u = draw_directions(x, state.seed, state.t, qs, self.distribution)
        signs = (1.0, -1.0) if self.antithetic else (1.0,)
        shifts = {k: torch.cat([s * self.radius * u[k] for s in signs]) for k in u}
        xs = {k: x[k] + shifts[k] for k in x}
        paths = shifts[next(iter(shifts))].shape[0]
        y = self.inner_start(problem, x, state)
        ys = self._perturbed_starts(problem, xs, y, paths, state)
        shared, own = [], []  # drawn in the order of the steps: the step's batch, then the paths'
        for _ in range(self.inner_steps):
            shared.append(problem.lower_batch())
            own.append([problem.lower_batch() for _ in range(paths * (not self.shares_batches))])
        y_state = self.optimizer.init(y)
        for batch in shared:
            y, y_state = self.optimizer.update(y, problem.grad_lower_y(x, y, batch), y_state)
        if paths:
            ys = self._perturbed_paths(problem, xs, ys, shared, own, state)
        problem.count("lower_grad", paths * self.inner_steps)
        ys = tr.detach(ys)
        problem.watch("lower_grad", ys)
        return Paths(y=tr.detach(y), xs=xs, ys=ys, u=u)

    def _perturbed_starts(
        self, problem: Problem, xs: Tree, y: Tree, paths: int, state: ESState
    ) -> Tree:
        """Each path's start, stacked: ``init_lower`` at its own x (MAML-style), else the
        unperturbed start (functional updates never write into it, so sharing it aliases
        nothing)."""
        if problem.init_lower is None or paths == 0:
            return {k: v.unsqueeze(0).expand(paths, *v.shape) for k, v in y.items()}
        if state.batched is not False:
            try:
                return tr.detach(vmap(problem.init_lower)(xs))
            except Exception:  # noqa: BLE001 - any vmap failure: fall back to the loop
                if state.batched:
                    raise
                state.batched = False
        starts = [tr.detach(problem.init_lower(xq)) for xq in _unstack(xs, paths)]
        return {k: torch.stack([start[k] for start in starts]) for k in starts[0]}

    def _perturbed_paths(
        self,
        problem: Problem,
        xs: Tree,
        ys: Tree,
        shared: list[Any],
        own: list[list[Any]],
        state: ESState,
    ) -> Tree:
        """y_N of every perturbed path, stacked (oracles uncounted: counted in bulk)."""
        opt = self.optimizer

        def descend(xq: Tree, yq: Tree, batches: list[Any]) -> Tree:
            sq = opt.init(yq)
            for batch in batches:
                yq, sq = opt.update(yq, problem.grad_lower_y(xq, yq, batch), sq)
            return yq

        with problem.uncounted(), problem.unwatched():
            if state.batched is not False:
                try:
                    out = vmap(lambda xq, yq: descend(xq, yq, shared))(xs, ys)
                    state.batched = True
                    return out
                except Exception:  # noqa: BLE001 - any vmap failure: fall back to the loop
                    if state.batched:
                        raise
                    state.batched = False
            paths = next(iter(ys.values())).shape[0]
            starts = zip(_unstack(xs, paths), _unstack(ys, paths), strict=True)
            ends = [
                descend(xq, yq, shared if self.shares_batches else [step[q] for step in own])
                for q, (xq, yq) in enumerate(starts)
            ]
            return {k: torch.stack([end[k] for end in ends]) for k in ends[0]}

    def _combine(self, values: Tensor, base: Tensor | None) -> Tensor:
        """Per-direction finite-difference coefficients from per-path values [P]."""
        if self.antithetic:
            plus, minus = values.chunk(2)
            return (plus - minus) / (2 * self.radius)
        return (values - base) / self.radius


def _unstack(stacked: Tree, n: int) -> list[Tree]:
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def _weighted_sum(coefficients: Tensor, u: Tree) -> Tree:
    """Σ_q c_q u_q for stacked directions u [Q, ...]."""
    return {k: torch.tensordot(coefficients.to(v.dtype), v, dims=1) for k, v in u.items()}


def _flat_paths(ys: Tree) -> Tensor:
    return torch.cat([v.flatten(1) for v in ys.values()], dim=1)


@register("esj")
@dataclass(kw_only=True)
class ESJ(Perturbed):
    """ESJ: exact ∇_x f, ∇_y f and a finite-difference (evolution-strategies) response Jacobian.

    Hessian-free, no graph through the inner loop (memory independent of ``inner_steps``).
    Oracles per step: (Q + 1)·N inner gradients ((2Q + 1)·N antithetic) and 1 upper gradient.
    For Gaussian directions the estimate is unbiased for the Jacobian of the μ-smoothed
    response (exactly unbiased when y_N is linear in x). See :class:`Perturbed` for options.
    """

    def partial_estimate(self, problem: Problem, x: Tree, state: ESState, qs: range) -> Partial:
        paths = self.run_paths(problem, x, state, qs)
        gx, gy = problem.grad_upper(tr.detach(x), paths.y, problem.upper_batch())
        flat_gy = tr.flatten(gy)
        values = _flat_paths(paths.ys) @ flat_gy  # ⟨y_N^path, ∇_y f⟩ for every path
        coefficients = self._combine(values, tr.flatten(paths.y) @ flat_gy)
        return Partial(base=gx, total=_weighted_sum(coefficients, paths.u), y=paths.y)


@register("esj_s")
@dataclass(kw_only=True)
class ESJS(ESJ):
    """ESJ-S: ESJ for stochastic problems, every inner mini-batch shared by all paths.

    One lower batch per inner step feeds the unperturbed and every perturbed path (common
    random numbers: otherwise batch noise dominates the difference δ); one upper batch gives
    ∇_x f and ∇_y f. ``common_batches=False`` gives each perturbed path its own batches (only
    to measure what sharing buys; it needs Q·N extra batches, drawn in sequence).
    """

    common_batches: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.common_batches, bool):
            raise ValueError(f"common_batches must be True or False, got {self.common_batches!r}")

    @property
    def shares_batches(self) -> bool:
        return self.common_batches


@register("hozog")
@dataclass(kw_only=True)
class HOZOG(Perturbed):
    """HOZOG baseline: the whole hypergradient by zeroth order, (F_N(x + μu) − F_N(x))/μ · u.

    Needs no upper gradient at all, and has far higher variance than ESJ (the direct term
    ∇_x f is estimated too). Oracles per step: (Q + 1)·N inner gradients ((2Q + 1)·N
    antithetic) and Q + 1 (2Q + 1) upper evaluations.
    """

    def partial_estimate(self, problem: Problem, x: Tree, state: ESState, qs: range) -> Partial:
        paths = self.run_paths(problem, x, state, qs)
        batch = problem.upper_batch()
        f0 = problem.upper_value(tr.detach(x), paths.y, batch)
        values = self._upper_values(problem, paths.xs, paths.ys, batch, state)
        coefficients = self._combine(values, f0)
        total = _weighted_sum(coefficients, paths.u)
        return Partial(base=tr.zeros_like(total), total=total, y=paths.y)

    def _upper_values(
        self, problem: Problem, xs: Tree, ys: Tree, batch: Any, state: ESState
    ) -> Tensor:
        paths = next(iter(ys.values())).shape[0]
        with problem.uncounted(), problem.unwatched():
            if state.batched:
                values = vmap(lambda xq, yq: problem.upper_value(xq, yq, batch))(xs, ys)
            else:
                pairs = zip(_unstack(xs, paths), _unstack(ys, paths), strict=True)
                values = torch.stack([problem.upper_value(xq, yq, batch) for xq, yq in pairs])
        problem.count("upper_eval", paths)
        problem.watch("upper_eval", values)
        return values


__all__ = [
    "DISTRIBUTIONS",
    "ESJ",
    "ESJS",
    "HOZOG",
    "ESState",
    "Partial",
    "Paths",
    "Perturbed",
    "direction_seed",
    "draw_direction",
    "draw_directions",
]
