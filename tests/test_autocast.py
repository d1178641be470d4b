"""bf16 autocast in the lower-level oracles: what precision it costs, measured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl

from helpers import relative_error


def weighted_logistic(autocast: torch.dtype | None) -> tuple[bl.Problem, dict, dict]:
    """Hyper-cleaning in miniature (float32): per-sample weights x, linear classifier y."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 30, generator=gen), torch.randint(0, 5, (200,), generator=gen)
    va, vb = torch.randn(100, 30, generator=gen), torch.randint(0, 5, (100,), generator=gen)

    def lower(x, y, _):
        ce = F.cross_entropy(F.linear(a, y["w"]), b, reduction="none")
        return (torch.sigmoid(x["s"]) * ce).mean() + 0.05 * y["w"].square().sum()

    def upper(x, y, _):
        return F.cross_entropy(F.linear(va, y["w"]), vb)

    problem = bl.Problem(upper, lower, lower_autocast=autocast)
    return problem, {"s": torch.zeros(200)}, {"w": torch.zeros(5, 30)}


@pytest.mark.parametrize("name", ["itd", "cg"])
def test_bf16_costs_about_bf16_precision(name):
    options = {"inner_steps": 30, "inner_lr": 0.5}
    exact = bl.hypergrad(*weighted_logistic(None), bl.method(name, **options))
    problem, x, y = weighted_logistic(torch.bfloat16)
    mixed = bl.hypergrad(problem, x, y, bl.method(name, **options))
    assert all(v.dtype == torch.float32 for v in mixed.values())
    error = relative_error(mixed, exact)
    # bf16 keeps 8 bits of mantissa (unit roundoff 2^-8 ≈ 4e-3): the error is of that order,
    # and not zero (autocast really ran)
    assert 1e-4 < error < 5e-2, error


def test_autocast_must_be_a_float_dtype():
    with pytest.raises(TypeError, match="lower_autocast"):
        bl.Problem(lambda x, y, b: 0, lambda x, y, b: 0, lower_autocast=torch.int8)
