"""MAML's few-shot sinusoid regression (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for
Fast Adaptation of Deep Networks", ICML 2017, section 5.1).

A task is y = A·sin(t − φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs t ~ U[−5, 5];
K support points to adapt on and K query points to score the adaptation. x is the initialisation
of an MLP 1→40→40→1 (ReLU); y holds one copy of its weights per task of the meta-batch, started at
x (``init_lower``); lower = support MSE, upper = query MSE of the adapted weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_nonnegative
from bilevel.modules import functional, params
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, proximal_term, register_task, solver_defaults
from bilevel.tree import Tree

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
EVAL_QUERY = 100  # query points per evaluation task (a dense estimate of the adapted fit)


class SineTasks(NamedTuple):
    """A stack of sinusoid tasks: inputs/targets are [tasks, points, 1]."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    amplitude: Tensor  # [tasks]
    phase: Tensor  # [tasks]


def sample_sine_tasks(
    tasks: int,
    k_shot: int,
    n_query: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SineTasks:
    """Draw ``tasks`` sinusoids and their support / query points from ``generator`` (on CPU,
    so a seed gives the same tasks on every device)."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return low + (high - low) * u

    amplitude = uniform(*AMPLITUDE, tasks)
    phase = uniform(*PHASE, tasks)
    inputs = uniform(*INPUT_RANGE, tasks, k_shot + n_query, 1)
    targets = amplitude[:, None, None] * torch.sin(inputs - phase[:, None, None])
    parts = (
        inputs[:, :k_shot],
        targets[:, :k_shot],
        inputs[:, k_shot:],
        targets[:, k_shot:],
        amplitude,
        phase,
    )
    return SineTasks(*(p.to(dtype=dtype, device=device) for p in parts))


class SineStream:
    """Endless seeded stream of meta-batches; every ``iter()`` restarts from ``seed`` so that a
    resumed run replays the same tasks."""

    def __init__(
        self,
        meta_batch: int,
        k_shot: int,
        n_query: int,
        seed: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        self.meta_batch = meta_batch
        self.k_shot = k_shot
        self.n_query = n_query
        self.seed = seed
        self.dtype = dtype
        self.device = device

    def __iter__(self) -> Iterator[SineTasks]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield sample_sine_tasks(
                self.meta_batch, self.k_shot, self.n_query, generator, self.dtype, self.device
            )


def mlp(hidden: int = 40) -> nn.Sequential:
    """Finn et al.'s regressor: 1 → hidden → hidden → 1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


@register_task("sinusoid")
def sinusoid(
    k_shot: int = 10,
    n_query: int = 10,
    meta_batch: int = 25,
    hidden: int = 40,
    eval_tasks: int = 100,
    eval_seed: int = 1234,
    seed: int = 0,
    proximal: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Task:
    """MAML sinusoid regression: ``meta_batch`` tasks per outer step from a stream seeded by
    ``seed`` (which also fixes the initialisation).

    Callback ``post_adaptation_mse``: mean query MSE over ``eval_tasks`` fixed test tasks
    (seeded by ``eval_seed``, ``k_shot`` support and EVAL_QUERY query points each) after the
    task's ``inner_steps`` plain GD steps of ``inner_lr`` from x.

    ``proximal=λ > 0`` is iMAML (Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit
    Gradients", NeurIPS 2019): the lower loss adds λ/2‖y_t − x‖² per task, so y*(x) depends on
    x and implicit methods (cg by default) differentiate it; the defaults then run 20 inner
    steps and 5 CG iterations.
    """
    check_nonnegative("proximal", proximal)
    if min(k_shot, n_query, meta_batch, hidden, eval_tasks) < 1:
        raise ValueError("k_shot, n_query, meta_batch, hidden and eval_tasks must be >= 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp(hidden)
    model = model.to(dtype=dtype, device=device)
    apply = functional(model)

    def task_mse(p: Tree, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(apply(p, inputs), targets)

    def per_task(y: Tree, inputs: Tensor, targets: Tensor) -> Tensor:
        return vmap(task_mse)(y, inputs, targets)

    def adaptation_loss(x: Tree, y: Tree, inputs: Tensor, targets: Tensor) -> Tensor:
        # a sum, so each task's copy takes its own step of inner_lr whatever the meta-batch
        loss = per_task(y, inputs, targets).sum()
        if proximal:
            loss = loss + proximal_term(x, y, proximal)
        return loss

    def lower(x: Tree, y: Tree, batch: SineTasks) -> Tensor:
        return adaptation_loss(x, y, batch.support_x, batch.support_y)

    def upper(x: Tree, y: Tree, batch: SineTasks) -> Tensor:
        return per_task(y, batch.query_x, batch.query_y).mean()

    def init_lower(x: Tree) -> Tree:  # one copy per task this rank holds
        tasks = meta_batch // distributed.world_size()
        return {k: v.unsqueeze(0).repeat(tasks, *([1] * v.dim())) for k, v in x.items()}

    defaults = {"inner_steps": 1, "inner_lr": 0.01}
    if proximal:
        defaults = {"inner_steps": 20, "inner_lr": min(0.01, 1.0 / proximal),
                    **solver_defaults(solver_iters=5)}  # fmt: skip
    test = sample_sine_tasks(
        eval_tasks, k_shot, EVAL_QUERY, torch.Generator().manual_seed(eval_seed), dtype, device
    )

    def post_adaptation_mse(ctx: StepContext) -> dict[str, float]:
        x = tr.detach(ctx.x)
        y = {k: v.unsqueeze(0).repeat(eval_tasks, *([1] * v.dim())) for k, v in x.items()}

        def support_loss(y_: Tree) -> Tensor:  # iMAML's test tasks adapt with the proximal term
            return adaptation_loss(x, y_, test.support_x, test.support_y)

        for _ in range(defaults["inner_steps"]):
            y = tr.axpy(-defaults["inner_lr"], grad(support_loss)(y), y)
        with torch.no_grad():
            mse = per_task(y, test.query_x, test.query_y).mean()
        return {"post_adaptation_mse": float(mse)}

    return Task(
        name="sinusoid",
        problem=Problem(
            upper=upper,
            lower=lower,
            task_data=SineStream(meta_batch, k_shot, n_query, seed, dtype, device),
            init_lower=init_lower,
        ),
        x0=params(model),
        y0=None,
        callbacks=[post_adaptation_mse],
        metadata={
            "k_shot": k_shot,
            "n_query": n_query,
            "meta_batch": meta_batch,
            "hidden": hidden,
            "amplitude": AMPLITUDE,
            "phase": PHASE,
            "input_range": INPUT_RANGE,
            "eval_tasks": eval_tasks,
            "eval_query": EVAL_QUERY,
            "eval_seed": eval_seed,
            "seed": seed,
            "proximal": proximal,
        },
        method_defaults=dict(defaults),
        # Finn et al. ran 70,000 outer steps; scaled down for CPU (10,000 take a few minutes)
        solve_defaults={"steps": 10000, "outer_optimizer": "adam", "outer_lr": 1e-3},
    )
