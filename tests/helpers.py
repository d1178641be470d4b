"""Reference computations written independently of the library (plain torch.autograd), and
generated test data shared by several test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import bilevel as bl


def relative_error(a: dict, b: dict) -> float:
    num = sum(float(torch.sum((a[k] - b[k]) ** 2)) for k in a)
    den = sum(float(torch.sum(b[k] ** 2)) for k in b)
    return (num / den) ** 0.5


def unrolled_value(problem: bl.Problem, x: dict, y0: dict, steps: int, lr: float) -> torch.Tensor:
    """F_K(x) = f(x, y_K(x)) with y_K from K plain GD steps, by torch.autograd only."""
    y = {k: v.detach().clone().requires_grad_(True) for k, v in y0.items()}
    for _ in range(steps):
        g = problem.lower(x, y, None)
        grads = torch.autograd.grad(g, list(y.values()))
        y = {
            k: (v - lr * d).detach().requires_grad_(True)
            for (k, v), d in zip(y.items(), grads, strict=True)
        }
    return problem.upper(x, {k: v.detach() for k, v in y.items()}, None)


def finite_difference(fn, x: dict, h: float = 1e-5) -> dict:
    """Central differences of a scalar function of a tree, coordinate by coordinate."""
    out = {}
    for key, value in x.items():
        grad = torch.zeros_like(value)
        flat = grad.view(-1)
        for i in range(value.numel()):
            plus = {k: v.clone() for k, v in x.items()}
            minus = {k: v.clone() for k, v in x.items()}
            plus[key].view(-1)[i] += h
            minus[key].view(-1)[i] -= h
            flat[i] = (fn(plus) - fn(minus)) / (2 * h)
        out[key] = grad
    return out


def logistic_l2_problem(n: int = 40, d: int = 5, seed: int = 0):
    """Logistic regression with one L2 weight per feature (x = log-weights): non-quadratic."""
    gen = torch.Generator().manual_seed(seed)
    Xtr = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Xva = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    ytr = (Xtr @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64) > 0).double()
    yva = (Xva @ w_true > 0).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def lower(x, y, batch):
        return bce(Xtr @ y["w"], ytr) + 0.5 * torch.sum(torch.exp(x["logl2"]) * y["w"] ** 2)

    def upper(x, y, batch):
        return bce(Xva @ y["w"], yva)

    x = {"logl2": torch.full((d,), -1.0, dtype=torch.float64)}
    y = {"w": torch.zeros(d, dtype=torch.float64)}
    return bl.Problem(upper=upper, lower=lower), x, y


def mlp_problem(seed: int = 0):
    """A tiny tanh MLP as inner model (through bl.params / functional_call); x = per-sample
    log-weights of the training loss and a scalar log weight decay."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    Xtr = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    Xva = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    ttr = torch.sin(Xtr.sum(1, keepdim=True))
    tva = torch.sin(Xva.sum(1, keepdim=True))

    def predict(y, X):
        return torch.func.functional_call(model, y, (X,))

    def lower(x, y, batch):
        per_sample = ((predict(y, Xtr) - ttr) ** 2).squeeze(1)
        decay = torch.exp(x["log_decay"]) * sum(torch.sum(p**2) for p in y.values())
        return torch.mean(torch.sigmoid(x["weights"]) * per_sample) + 0.5 * decay

    def upper(x, y, batch):
        return torch.mean((predict(y, Xva) - tva) ** 2)

    x = {
        "weights": torch.zeros(12, dtype=torch.float64),
        "log_decay": torch.tensor(-2.0, dtype=torch.float64),
    }
    return bl.Problem(upper=upper, lower=lower), x, bl.params(model)


def strictly_decreasing(values: list[float]) -> bool:
    return all(values[i] > values[i + 1] for i in range(len(values) - 1))


def stroke_glyphs(
    root: Path,
    alphabets: int,
    characters: int,
    drawings: int,
    size: int,
    strokes: int,
    span: tuple[float, float],
    jitter: float,
) -> Path:
    """An Omniglot-layout folder of generated glyphs: each character ``strokes`` random lines
    with end points uniform in ``span``, each drawing a copy jittered by N(0, ``jitter``) (ink 0
    on 255, ``size``×``size``); seeded, so every call draws the same glyphs."""
    rng = np.random.default_rng(0)
    for a in range(alphabets):
        for c in range(characters):
            lines = rng.uniform(*span, size=(strokes, 4))
            folder = root / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for k in range(drawings):
                img = Image.new("L", (size, size), 255)
                draw = ImageDraw.Draw(img)
                for line in lines + rng.normal(0, jitter, size=lines.shape):
                    draw.line(line.tolist(), fill=0, width=2)
                img.save(folder / f"{k + 1:02d}.png")
    return root
