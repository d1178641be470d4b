"""Many hyperparameters: one L2 weight per inner weight of a small conv net (FashionMNIST),
tuned with sgld's diagonal estimator.

    g(x, y) = CE(train batch; net_y) + ½ Σ_i exp(x_i) y_i²      (x and y share keys and shapes)
    f(x, y) = CE(validation batch; net_y)

Prints one JSON line per width: hyperparameter count, seconds per outer step (median of the
timed steps), and the process's peak resident memory. Run each width in its own process
(peak RSS is per process): python benchmarks/langevin/per_weight_l2.py WIDTH [STEPS]
"""

from __future__ import annotations

import json
import resource
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel.data.idx import load_fashion_mnist


def conv_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 49, 10),
    )  # fmt: skip


def main() -> None:
    width, steps = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_fashion_mnist()
    images = torch.as_tensor(data["train_images"][:2000], dtype=torch.float32).unsqueeze(1) / 255
    labels = torch.as_tensor(data["train_labels"][:2000], dtype=torch.int64)
    train = [(images[i : i + 100], labels[i : i + 100]) for i in range(0, 1000, 100)]
    val = [(images[i : i + 100], labels[i : i + 100]) for i in range(1000, 2000, 100)]
    net = conv_net(width)
    apply = bl.functional(net)

    def lower(x, y, batch):
        a, t = batch
        decay = sum(torch.sum(torch.exp(x[k]) * y[k] ** 2) for k in y)
        return F.cross_entropy(apply(y, a), t) + 0.5 * decay

    def upper(x, y, batch):
        a, t = batch
        return F.cross_entropy(apply(y, a), t)

    problem = bl.Problem(upper=upper, lower=lower, upper_data=val, lower_data=train)
    y0 = bl.params(net)
    x0 = {k: torch.full_like(v, -6.0) for k, v in y0.items()}
    method = bl.method(
        "sgld", estimator="diagonal", inner_steps=5, inner_lr=0.05, temperature=1e-5, seed=0
    )
    times: list[float] = []
    result = bl.solve(
        problem, x0, y0, method, steps=steps, outer_lr=0.01,
        on_log=lambda row: times.append(row["seconds"]),
    )  # fmt: skip
    per_step = [b - a for a, b in zip(times, times[1:], strict=False)]
    print(json.dumps({
        "width": width,
        "hyperparameters": sum(v.numel() for v in x0.values()),
        "seconds_per_outer_step": statistics.median(per_step),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_upper_loss": result.history[-1]["upper_loss"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
