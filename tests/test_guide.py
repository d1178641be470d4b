"""The guide's examples run as written and do what they say."""

import re
from pathlib import Path

import torch

import bilevel as bl

GUIDE = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()


def _block(after: str, containing: str) -> str:
    section = GUIDE[GUIDE.index(after) :]
    return next(code for code in re.findall(r"```python\n(.*?)```", section, re.S)
                if containing in code)  # fmt: skip


def test_implicit_example_gives_the_closed_form_hypergradient():
    namespace: dict = {}
    exec(_block("## 6.", "bl.implicit"), namespace)  # noqa: S102 - our own docs
    X, t, X_val, t_val = (namespace[k] for k in ("X", "t", "X_val", "t_val"))
    log_l2 = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    w = torch.linalg.solve(X.T @ X / 100 + torch.diag(log_l2.exp()), X.T @ t / 100)
    (expected,) = torch.autograd.grad(torch.mean((X_val @ w - t_val) ** 2), log_l2)
    got = namespace["log_l2"].grad
    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-8


def test_epoch_shuffle_recipe_resumes_bit_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    labels = X @ torch.ones(3, dtype=torch.float64)
    namespace = {
        "torch": torch,
        "train": torch.utils.data.TensorDataset(torch.arange(30), X, labels),
    }
    code = _block("**Shuffling that resumes", "EpochShuffle")
    code = code.replace("batch_size=128", "batch_size=8")

    def run(steps, checkpoint):
        exec(code, namespace)  # noqa: S102 - a fresh loader at epoch 0, as the guide says
        problem = bl.Problem(
            upper=lambda x, y, b: torch.mean((X @ y["w"] - labels) ** 2),
            lower=lambda x, y, b: torch.mean(
                torch.sigmoid(x["s"][b[0]]) * (b[1] @ y["w"] - b[2]) ** 2
            ),
            lower_data=namespace["lower_data"],
        )
        x0 = {"s": torch.zeros(30, dtype=torch.float64)}
        y0 = {"w": torch.zeros(3, dtype=torch.float64)}
        return bl.solve(problem, x0, y0, bl.method("cg", inner_steps=5, inner_lr=0.3),
                        steps=steps, checkpoint=checkpoint, checkpoint_every=3)  # fmt: skip

    full = run(8, None)
    run(4, tmp_path / "c.pt")  # stops after step 4 (checkpoints at 3 and 4)
    resumed = run(8, tmp_path / "c.pt")
    assert torch.equal(full.x["s"], resumed.x["s"]) and torch.equal(full.y["w"], resumed.y["w"])
