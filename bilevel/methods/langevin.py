"""Stochastic bilevel optimization with SGLD: a Gibbs distribution replaces the inner argmin.

Kim and Hospedales, "A Stochastic Approach to Bi-Level Optimization for Hyperparameter
Optimization and Meta Learning", AAAI 2025 (arXiv 2410.10417). The outer objective becomes

    F_τ(x) = E_{y ~ p_τ(·|x)} f(x, y),     p_τ(y | x) ∝ exp(−g(x, y)/τ),

sampled by stochastic-gradient Langevin dynamics on the inner energy,

    y_{k+1} = y_k − η ∇_y ĝ(x, y_k) + sqrt(2 η τ) ξ_k,

and its hypergradient is estimated recurrently along the chain, with no stored chain and no
Jacobian. The paper's exact first-order approximation was not available to us; the three
estimators below are our design, checked against closed forms in tests/test_langevin.py (see
docs/methods/langevin.md for what is exact and what is approximate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import InnerOptimizer
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree

ESTIMATORS = ("forward", "diagonal", "covariance")
DEFAULT_TEMPERATURE = 1e-3  # τ when neither ``temperature`` nor ``data_size`` is given
CURVATURE_EMA = 0.1  # weight of a new Hutchinson sample in the diagonal-Hessian running mean


@dataclass
class LangevinState(MethodState):
    """Adds the persistent chains (leading dimension = ``chains``), the estimator's recurrent
    variable (``forward``: the adjoint q, shaped like y; ``diagonal``: the diagonal Jacobian d,
    shaped like x), the diagonal-Hessian estimate (``diagonal``), and what the noise is derived
    from: ``noise_seed`` and the outer-step counter, so a resumed run draws the same noise.
    ``samples`` holds the last ``keep_samples`` used chain states (leading dimension = samples),
    for predictions averaged over the chain (:func:`chain_average`)."""

    chains: Tree | None = None
    samples: Tree | None = None
    carry: Tree | None = None
    curvature: Tree | None = None
    noise_seed: int = 0
    outer_step: int = 0


@register("sgld")
@dataclass(kw_only=True)
class SGLD(Method):
    """SGLD sampling of the Gibbs inner distribution, recurrent hypergradient (Kim & Hospedales).

    Each outer step runs ``burn_in + inner_steps`` Langevin steps of size ``inner_lr`` (the
    old alias ``step_size`` is rejected) at temperature ``temperature`` on ``chains`` chains
    (vmapped; persistent across outer steps when ``warm_start``) and averages the estimator
    over every ``thin``-th step after burn-in. ``state.y`` is the mean of those samples (the
    estimate of E[y]).

    ``estimator``:
      - ``forward`` (default): hg = mean of ∇_x f − ∇²_xy g · q_k, with the adjoint q carried along
        the chain, q ← ρ q − η (∇²_yy g · q − ∇_y f) (``hessian=False`` drops the HVP and needs
        ``damping`` ρ < 1). Exact in expectation at stationarity when g is quadratic in y.
      - ``diagonal``: per-parameter hyperparameters (x's leaves are leaves of y with the same
        shape, each hyperparameter touching only its own weight): diagonal Jacobian
        d ← ρ d − η (h ⊙ d + ∂²g/∂y_i∂x_i), h a Hutchinson diagonal-Hessian estimate;
        hg = mean of ∇_x f + d ⊙ ∇_y f. Approximate (Jacobi) unless ∇²_yy g is diagonal.
      - ``covariance``: the exact identity ∇F_τ = E[∇_x f] − Cov(f, ∇_x g)/τ with running sums;
        the reference (its only bias is the chain's discretization).
    ``seed``: the noise seed; ``None`` draws it from torch's global RNG at ``init`` (so
    ``bl.solve(seed=...)`` varies it; rank 0's draw under torch.distributed, as ES's).
    ``temperature``: τ; when it is ``None`` and ``data_size`` N (the number of samples the lower
    loss averages) is given, τ = 1/N — the Bayesian posterior exp(−N·g) of a mean loss — else
    ``DEFAULT_TEMPERATURE`` (1e-3). An explicit ``temperature`` wins over ``data_size``.
    ``keep_samples``: keep the last that many used chain states (over outer steps while the
    chains persist) in ``state.samples``, for :func:`chain_average` (0: keep none).
    Oracles per chain step and chain: 1 inner gradient (``diagonal``: 1 JVP instead), and per
    used step: ``forward`` 1 upper gradient, and the inner gradient replaced by one
    linearisation whose pullbacks give 1 HVP and 1 mixed product together (``hessian=False``:
    the inner gradient + 1 linearisation for the mixed product); ``diagonal`` 1 upper gradient
    + 1 linearisation and 1 HVP for the probe; ``covariance`` 1 upper gradient + 1 upper
    evaluation + 1 ∇_x g.
    """

    inner_optimizer: str | InnerOptimizer = field(default="gd", init=False)
    RENAMED = {"step_size": "inner_lr"}
    temperature: float | None = None
    data_size: int | None = None
    keep_samples: int = 0
    burn_in: int = 0
    thin: int = 1
    chains: int = 1
    estimator: str = "forward"
    hessian: bool = True
    damping: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("inner_steps", self.inner_steps, 1)
        if self.temperature is not None:
            check_positive("temperature", self.temperature)
        if self.data_size is not None:
            check_int("data_size", self.data_size, 1)
        check_int("keep_samples", self.keep_samples, 0)
        check_int("burn_in", self.burn_in, 0)
        check_int("thin", self.thin, 1)
        check_int("chains", self.chains, 1)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}"
            )
        if not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if not self.hessian and self.damping == 1 and self.estimator != "covariance":
            raise ValueError(
                "hessian=False drops the curvature term, so the recurrence only stays bounded "
                "with damping < 1 (e.g. damping=0.9)"
            )
        if self.estimator == "covariance" and self.chains * self._recorded() < 2:
            raise ValueError(
                "the covariance estimator needs at least 2 samples per outer step "
                "(chains × used steps); raise chains or inner_steps"
            )

    @property
    def eta(self) -> float:
        return self.inner_lr

    @property
    def tau(self) -> float:
        """The temperature used: ``temperature``, else 1/``data_size``, else the default."""
        if self.temperature is not None:
            return self.temperature
        if self.data_size is not None:
            return 1.0 / self.data_size
        return DEFAULT_TEMPERATURE

    def _recorded(self) -> int:
        """Used (recorded) steps per chain and outer step."""
        return len([k for k in range(self.inner_steps) if (self.burn_in + k) % self.thin == 0])

    # ----------------------------------------------------------------- state
    def init(self, problem: Problem, x: Tree, y: Tree | None) -> LangevinState:
        base = super().init(problem, x, y)
        if self.estimator == "diagonal":
            _check_per_parameter(x, base.y)
        seed = self.seed
        if seed is None:  # from the global RNG, which solve seeds: runs differ by seed
            seed = distributed.shared_seed(tr.device(x))
        return LangevinState(y=base.y, y0=base.y0, noise_seed=seed)

    def _start(self, problem: Problem, x: Tree, state: LangevinState) -> tuple[Tree, Tree | None]:
        """This outer step's chains and recurrent variable: carried over, or restarted from
        init_lower(x) (meta-learning) / y0 (``warm_start=False``)."""
        if state.chains is not None and self.warm_start and problem.init_lower is None:
            return state.chains, state.carry
        start = self.inner_start(problem, x, state)
        chains = {
            k: v.detach().unsqueeze(0).repeat_interleave(self.chains, 0) for k, v in start.items()
        }
        if self.estimator == "forward":
            return chains, tr.zeros_like(chains)
        if self.estimator == "diagonal":
            return chains, {k: torch.zeros_like(chains[k]) for k in x}
        return chains, None

    # ----------------------------------------------------------------- step
    def step(self, problem: Problem, x: Tree, state: LangevinState) -> tuple[Tree, LangevinState]:
        x = tr.detach(x)
        carried = state.chains is not None and self.warm_start and problem.init_lower is None
        chains, carry = self._start(problem, x, state)
        curvature = state.curvature if carried else None
        gen = _generator(state.noise_seed, state.outer_step, tr.device(x))
        noise_scale = math.sqrt(2 * self.eta * self.tau)
        samples = state.samples if carried else None
        sums = _Sums(self.estimator)
        y_sum = tr.zeros_like(chains)
        for k in range(self.burn_in + self.inner_steps):
            batch = problem.lower_batch()
            used = k % self.thin == 0
            record = used and k >= self.burn_in
            if self.estimator == "forward":
                out = self._forward(problem, x, chains, carry, batch, used, record)
            elif self.estimator == "diagonal":
                out = self._diagonal(problem, x, chains, carry, curvature, batch, used, record, gen)
            else:
                out = self._covariance(problem, x, chains, batch, record)
            carry = out.get("carry", carry)
            curvature = out.get("curvature", curvature)
            if record:
                sums.add_mean(out["sample"])
                if "value" in out:
                    sums.add_covariance(out["value"], out["grad_x_lower"])
                y_sum = tr.add(y_sum, chains)
                if self.keep_samples:
                    samples = _keep_last(samples, chains, self.keep_samples)
            noise = tr.randn_like(chains, generator=gen)
            chains = {
                key: value - self.eta * out["grad_y"][key] + noise_scale * noise[key]
                for key, value in chains.items()
            }
        hg = sums.estimate(self.tau)
        problem.watch("lower_grad", chains)
        problem.watch("upper_grad", hg)
        state.y = {key: value.sum(0) / sums.n for key, value in y_sum.items()}
        state.chains, state.carry, state.curvature = chains, carry, curvature
        state.samples = samples
        state.outer_step += 1
        return hg, state

    # ----------------------------------------------------------------- estimators
    # Each returns per-chain outputs (leading dimension = chains): "grad_y" (the Langevin
    # drift), and as they apply "carry", "curvature", "sample" (the term averaged into hg),
    # "value" and "grad_x_lower" (covariance).
    def _forward(self, problem, x, chains, q, batch, used, record) -> dict[str, Any]:
        """Adjoint recurrence q ← ρ q − η (A q − ∇_y f); sample ∇_x f − ∇²_xy g · q."""
        if not used:
            return self._lower_grad(problem, x, chains, batch)
        upper = problem.upper_batch()
        eta, rho, hessian = self.eta, self.damping, self.hessian

        def one(y: Tree, q_: Tree) -> dict[str, Any]:
            fx, fy = problem.grad_upper(x, y, upper)
            if hessian:  # the drift, A q and the mixed product from one linearisation
                grad_y, curv, mixed = problem.lower_grad_products(x, y, q_, batch, mixed=record)
            else:
                grad_y, curv = problem.grad_lower_y(x, y, batch), tr.zeros_like(q_)
                mixed = problem.mixed_lower_xy(x, y, q_, batch) if record else None
            # q ← ρ q − η (A q − ∇_y f): a damped fixed-point step towards A⁻¹ ∇_y f
            carry = {k: rho * q_[k] - eta * (curv[k] - fy[k]) for k in q_}
            out = {"grad_y": grad_y, "carry": carry}
            if record:
                out["sample"] = tr.sub(fx, mixed)
            return out

        out = self._map(problem, one, chains, q)
        self._count(
            problem,
            upper_grad=1,
            lower_grad=int(not hessian),
            linearize=int(hessian or record),
            hvp=int(hessian),
            mixed=int(record),
        )
        return out

    def _diagonal(self, problem, x, chains, d, h, batch, used, record, gen) -> dict[str, Any]:
        """d ← ρ d − η (h ⊙ d + c) with c_i = ∂²g/∂y_i∂x_i; sample ∇_x f + d ⊙ ∇_y f."""
        ones = {k: torch.ones_like(v) for k, v in x.items()}
        upper = problem.upper_batch() if record else None
        probe = _rademacher(chains, gen) if used and self.hessian else None
        eta, rho = self.eta, self.damping

        def one(y: Tree, d_: Tree, h_: Tree | None, z: Tree | None) -> dict[str, Any]:
            # one JVP along (dx = 1, dy = 0): the drift and, for a diagonal ∇²_yx g, its diagonal
            grad_y, c = problem.jvp_lower_grad(x, y, ones, tr.zeros_like(y), batch)
            out: dict[str, Any] = {"grad_y": grad_y}
            if z is not None:
                hz = problem.hvp_lower_yy(x, y, z, batch)
                fresh = {k: z[k] * hz[k] for k in x}
                h_ = (
                    fresh
                    if h_ is None
                    else {k: h_[k] + CURVATURE_EMA * (fresh[k] - h_[k]) for k in x}
                )
                out["curvature"] = h_
            if record:
                fx, fy = problem.grad_upper(x, y, upper)
                out["sample"] = {k: fx[k] + d_[k] * fy[k] for k in x}
            # d ← ρ d − η (h ⊙ d + c): the diagonal of the Jacobian recurrence
            hd = {k: torch.clamp(h_[k], min=0) * d_[k] for k in x} if h_ is not None else None
            out["carry"] = {
                k: rho * d_[k] - eta * (c[k] if hd is None else hd[k] + c[k]) for k in x
            }
            return out

        out = self._map(problem, one, chains, d, h, probe)
        probed = int(probe is not None)
        self._count(problem, jvp=1, linearize=probed, hvp=probed, upper_grad=int(record))
        return out

    def _covariance(self, problem, x, chains, batch, record) -> dict[str, Any]:
        """Per-sample f, ∇_x f and ∇_x g for E[∇_x f] − Cov(f, ∇_x g)/τ."""
        if not record:
            return self._lower_grad(problem, x, chains, batch)
        upper = problem.upper_batch()

        def one(y: Tree) -> dict[str, Any]:
            return {
                "grad_y": problem.grad_lower_y(x, y, batch),
                "value": problem.upper_value(x, y, upper),
                "sample": problem.grad_upper(x, y, upper)[0],
                "grad_x_lower": problem.grad_lower_x(x, y, batch),
            }

        out = self._map(problem, one, chains)
        self._count(problem, lower_grad=1, upper_eval=1, upper_grad=1, lower_grad_x=1)
        return out

    # ----------------------------------------------------------------- helpers
    def _lower_grad(self, problem: Problem, x: Tree, chains: Tree, batch: Any) -> dict[str, Any]:
        out = self._map(problem, lambda y: {"grad_y": problem.grad_lower_y(x, y, batch)}, chains)
        self._count(problem, lower_grad=1)
        return out

    def _map(self, problem: Problem, fn: Callable, *args: Any) -> Any:
        """``fn`` on every chain at once (vmap over the leading dimension; ``None`` args are
        passed as ``None``). Oracles inside are neither counted nor watched (their outputs are
        batched); the callers count them per chain and the step watches its results."""
        dims = tuple(None if a is None else 0 for a in args)
        with problem.uncounted(), problem.unwatched():
            return vmap(fn, in_dims=dims)(*args)

    def _count(self, problem: Problem, **oracles: int) -> None:
        for oracle, calls in oracles.items():
            if calls:
                problem.count(oracle, calls * self.chains)


class _Sums:
    """Running sums over samples (chains × used steps) of one outer step: the mean of a tree,
    and for ``covariance`` the cross-covariance of a scalar with a tree (Chan's pairwise
    update, numerically stable)."""

    def __init__(self, estimator: str) -> None:
        self.estimator = estimator
        self.n = 0
        self.total: Tree | None = None
        self.cov_n = 0
        self.mean_f: Tensor | None = None
        self.mean_g: Tree | None = None
        self.comoment: Tree | None = None

    def add_mean(self, batch: Tree) -> None:
        part = {k: v.sum(0) for k, v in batch.items()}
        self.total = part if self.total is None else tr.add(self.total, part)
        self.n += next(iter(batch.values())).shape[0]

    def add_covariance(self, f: Tensor, g: Tree) -> None:
        m = f.shape[0]
        mean_f = f.mean(0)
        mean_g = {k: v.mean(0) for k, v in g.items()}
        centered = f - mean_f
        comoment = {k: torch.tensordot(centered, v - mean_g[k], dims=1) for k, v in g.items()}
        if self.mean_f is None:
            self.cov_n, self.mean_f, self.mean_g, self.comoment = m, mean_f, mean_g, comoment
            return
        n = self.cov_n + m
        delta_f = mean_f - self.mean_f
        weight = self.cov_n * m / n
        for k in g:
            delta_g = mean_g[k] - self.mean_g[k]
            self.comoment[k] = self.comoment[k] + comoment[k] + weight * delta_f * delta_g
            self.mean_g[k] = self.mean_g[k] + delta_g * (m / n)
        self.mean_f = self.mean_f + delta_f * (m / n)
        self.cov_n = n

    def estimate(self, temperature: float) -> Tree:
        mean = tr.scale(self.total, 1.0 / self.n)
        if self.estimator != "covariance":
            return mean
        scale = 1.0 / ((self.cov_n - 1) * temperature)
        return {k: mean[k] - scale * self.comoment[k] for k in mean}


def _keep_last(samples: Tree | None, chains: Tree, keep: int) -> Tree:
    """Append this step's chain states (detached) to the kept samples, dropping the oldest
    beyond ``keep``."""
    fresh = tr.detach(chains)
    if samples is None:
        return {k: v[-keep:] for k, v in fresh.items()}
    return {k: torch.cat([samples[k], fresh[k]])[-keep:] for k in fresh}


def chain_average(predict: Callable[[Tree], Tensor], samples: Tree) -> Tensor:
    """The mean of ``predict(y)`` over the kept chain samples (``state.samples`` with
    ``keep_samples``): the Monte-Carlo posterior predictive E_y[predict(y)], which for a
    non-linear model differs from ``predict`` at the mean weights ``state.y``. For a classifier,
    average probabilities (``predict`` returning softmax outputs), not logits."""
    count = next(iter(samples.values())).shape[0]
    total = None
    for i in range(count):  # one sample at a time: memory of one prediction, not of all
        out = predict({k: v[i] for k, v in samples.items()})
        total = out if total is None else total + out
    return total / count


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one outer step, seeded from (seed, step) alone: reproducible, and a
    resumed run (which restores the step counter) draws exactly the noise it would have."""
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed) >> 1)


def _rademacher(like: Tree, gen: torch.Generator) -> Tree:
    return {
        k: torch.randint(0, 2, v.shape, generator=gen, device=v.device).to(v.dtype) * 2 - 1
        for k, v in like.items()
    }


def _check_per_parameter(x: Tree, y: Tree) -> None:
    """The diagonal estimator pairs each leaf of x with the leaf of y of the same name."""
    for k, v in x.items():
        if k not in y or y[k].shape != v.shape:
            shapes = {name: tuple(t.shape) for name, t in y.items()}
            raise ValueError(
                "estimator='diagonal' needs one hyperparameter per inner weight: every leaf of "
                f"x must be a leaf of y with the same shape, but x[{k!r}] has shape "
                f"{tuple(v.shape)} and y has {shapes}"
            )
