"""Does torch.compile speed up the AID step's oracles on CPU? A probe, not a feature.

The hand-written AID-CG step of the peer benchmark (FashionMNIST hyper-cleaning, linear model,
10 GD inner steps, one linearisation of ∇_y g and 10 CG HVPs + 1 mixed product through it),
with the inner gradient eager or wrapped in ``torch.compile``; the linearised loss cannot be
compiled (torch.compile's aot_autograd does not support the double backward of HVPs). CPU
seconds per outer step after warm-up (compilation excluded and reported separately).

    python benchmarks/oracles/compile_probe.py [--steps 10] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bilevel.tasks.hyper_cleaning import hyper_cleaning


def make_step(data, weight_decay: float, compiled: bool):
    a, labels, a_val, l_val = data

    def lower(x, w, b):
        ce = F.cross_entropy(F.linear(a, w, b), labels, reduction="none")
        return torch.mean(torch.sigmoid(x) * ce) + weight_decay * (
            w.square().sum() + b.square().sum()
        )

    def upper(w, b):
        return F.cross_entropy(F.linear(a_val, w, b), l_val)

    def inner_grad(x, w, b):
        w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
        return torch.autograd.grad(lower(x, w, b), (w, b))

    # the linearised loss stays eager: torch 2.13's compiled graphs (aot_autograd) refuse the
    # double backward the HVPs and the mixed product need ("does not currently support double
    # backward"); only the first-order inner gradients can be compiled
    loss = lower
    grad_fn = torch.compile(inner_grad) if compiled else inner_grad

    def step(x, w, b):
        for _ in range(10):
            gw, gb = grad_fn(x, w, b)
            w, b = w - 0.5 * gw, b - 0.5 * gb
        wl, bl_ = w.detach().requires_grad_(), b.detach().requires_grad_()
        fw, fb = torch.autograd.grad(upper(wl, bl_), (wl, bl_))
        xl = x.detach().requires_grad_()
        w2, b2 = w.detach().requires_grad_(), b.detach().requires_grad_()
        gw, gb = torch.autograd.grad(loss(xl, w2, b2), (w2, b2), create_graph=True)

        def hvp(vw, vb):
            return torch.autograd.grad((gw, gb), (w2, b2), (vw, vb), retain_graph=True)

        vw, vb = torch.zeros_like(w), torch.zeros_like(b)
        rw, rb = fw, fb
        pw, pb = rw, rb
        rr = (rw * rw).sum() + (rb * rb).sum()
        for _ in range(10):
            aw, ab = hvp(pw, pb)
            alpha = rr / ((pw * aw).sum() + (pb * ab).sum())
            vw, vb = vw + alpha * pw, vb + alpha * pb
            rw, rb = rw - alpha * aw, rb - alpha * ab
            rr_new = (rw * rw).sum() + (rb * rb).sum()
            pw, pb = rw + (rr_new / rr) * pw, rb + (rr_new / rr) * pb
            rr = rr_new
        (mixed,) = torch.autograd.grad((gw, gb), (xl,), (vw, vb))
        return -mixed, w.detach(), b.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = hyper_cleaning(dataset="fashion_mnist", dtype=torch.float32)
    split = task.metadata["data"]
    data = (split.train, split.train_labels, split.val, split.val_labels)
    x = torch.zeros(len(split.train))
    w0, b0 = torch.zeros(10, 784), torch.zeros(10)
    steps, compile_s, times = {}, {}, {}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        steps[name] = make_step(data, split.weight_decay, compiled)
        start = time.perf_counter()
        hg_ref = steps[name](x, w0, b0)[0]
        compile_s[name] = time.perf_counter() - start
        times[name] = []
        steps[name + "_check"] = hg_ref
    difference = float(
        (steps["eager_check"] - steps["compiled_check"]).norm() / steps["eager_check"].norm()
    )
    for _ in range(args.rounds):
        for name in ("eager", "compiled"):
            w, b = w0, b0
            start = time.process_time()
            for _ in range(args.steps):
                _, w, b = steps[name](x, w, b)
            times[name].append((time.process_time() - start) / args.steps)
    result = {
        "cpu_s_per_step": {k: statistics.median(v) for k, v in times.items()},
        "first_call_wall_s": compile_s,
        "relative_difference_of_first_hypergradient": difference,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
