"""No autograd graph survives an outer step: 200 itd steps do not grow memory."""

import gc

import torch

import bilevel as bl


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def test_itd_solve_does_not_leak_graphs():
    torch.manual_seed(0)
    d = 256  # each step's graph holds ~20 inner iterates of 64k doubles (~10 MB)
    X = torch.randn(64, d, dtype=torch.float64)
    t = torch.randn(64, 16, dtype=torch.float64)
    problem = bl.Problem(
        upper=lambda x, y, b: torch.mean((X @ y["W"] - t) ** 2),
        lower=lambda x, y, b: (
            torch.mean((X @ y["W"] - t) ** 2) + torch.exp(x["logl2"]) * torch.sum(y["W"] ** 2)
        ),
    )
    x = {"logl2": torch.tensor(-2.0, dtype=torch.float64)}
    y = {"W": torch.zeros(d, 16, dtype=torch.float64)}
    method = bl.method("itd", inner_steps=20, inner_lr=0.01)
    rows = []

    def probe(ctx):
        assert ctx.hg["logl2"].grad_fn is None and not ctx.hg["logl2"].requires_grad
        assert all(v.grad_fn is None for v in ctx.state.y.values())
        if ctx.step in (20, 200):
            gc.collect()
            rows.append(_rss_mb())

    bl.solve(problem, x, y, method, steps=200, outer_lr=0.01, callbacks=[probe])
    growth = rows[1] - rows[0]
    assert growth < 40, f"memory grew by {growth:.1f} MB over 180 outer steps"
