"""Shared representations: declaring z = φ(x, batch) changes the cost, not the result.

For every method, a problem whose losses see x only through declared representations gives
the same hypergradient (to 1e-10 in float64) as the same losses with φ written inside, and φ is
evaluated once per outer step instead of once per inner gradient or product.
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.tasks.hyper_representation import hyper_representation

OPTIONS = {
    "itd": {},
    "forward": {},
    "cg": {"solver_iters": 5, "solver_tol": 0.0},
    "neumann": {"solver_iters": 4},
    "fixed_point": {"solver_iters": 4},
    "subbio": {},
    "lancbio": {},
    "soba": {},
    "amigo": {},
    "stocbio": {},
    "bda": {"mu": 0.5},
    "esj": {"directions": 3, "seed": 1},
    "hozog": {"directions": 3, "seed": 1},
    "sgld": {"seed": 1, "temperature": 1e-3, "burn_in": 2},
}


def _problems(counter: dict) -> tuple[bl.Problem, bl.Problem, dict, dict]:
    task = hyper_representation("deep", p=6, d=5, n=12, hidden=7, seed=0)
    features, splits = task.metadata["features"], task.metadata["splits"]
    reg = task.metadata["reg"]

    def counted(x, inputs):
        counter["calls"] += 1
        return features(x, inputs)

    def head(z, y, split):
        return 0.5 * torch.mean((z @ y["w"] - splits[split][1]) ** 2)

    def lower(z, y, b):
        return head(z, y, "train") + 0.5 * reg * torch.sum(y["w"] ** 2)

    inside = bl.Problem(
        upper=lambda x, y, b: head(counted(x, splits["val"][0]), y, "val"),
        lower=lambda x, y, b: lower(counted(x, splits["train"][0]), y, b),
    )
    declared = bl.Problem(
        upper=lambda z, y, b: head(z, y, "val"),
        lower=lower,
        upper_representation=lambda x, b: counted(x, splits["val"][0]),
        lower_representation=lambda x, b: counted(x, splits["train"][0]),
    )
    return inside, declared, task.x0, task.y0


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_declared_representation_gives_the_same_hypergradient(name):
    counter = {"calls": 0}
    inside, declared, x0, y0 = _problems(counter)
    method = bl.method(name, inner_steps=4, inner_lr=0.1, **OPTIONS[name])
    expected = bl.hypergrad(inside, x0, y0, method, steps=2)
    calls_inside = counter["calls"]
    counter["calls"] = 0
    got = bl.hypergrad(declared, x0, y0, method, steps=2)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
    assert counter["calls"] <= calls_inside
    assert dict(declared.counts) == dict(inside.counts)


def test_phi_runs_once_per_level_and_step_for_an_implicit_method():
    counter = {"calls": 0}
    inside, declared, x0, y0 = _problems(counter)
    method = bl.method("cg", inner_steps=6, inner_lr=0.1, solver_iters=5, solver_tol=0.0)
    bl.hypergrad(inside, x0, y0, method, steps=3)
    assert counter["calls"] >= 3 * (6 + 2)  # per inner gradient, upper gradient, linearisation
    counter["calls"] = 0
    bl.hypergrad(declared, x0, y0, method, steps=3)
    # validation (2) + per step: one lower and one upper representation
    assert counter["calls"] == 2 + 3 * 2


def test_a_modified_x_is_not_served_a_stale_representation():
    counter = {"calls": 0}
    _, declared, x0, y0 = _problems(counter)
    x = {k: v.clone() for k, v in x0.items()}
    first = declared.lower_value(x, y0)
    with torch.no_grad():
        next(iter(x.values())).add_(1.0)  # in place: same tensor object, new version
    assert not torch.equal(declared.lower_value(x, y0), first)
