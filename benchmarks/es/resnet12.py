"""Few-shot with the ResNet-12 backbone (feature form, 5-way 5-shot): ESJ vs ITD vs CG at a fixed
budget of outer steps, the scale of ESJ's mini-ImageNet experiment (Sow, Ji, Liang,
arXiv 2110.07004).

Per (method, seed) it records seconds per outer step (wall clock of the method and the outer
update, and CPU process time), peak memory (CUDA: max allocated; CPU: the process's peak RSS,
which includes the Python, torch and dataset baseline, also recorded), the device's name, the
upper loss and the meta-test accuracy (with its 95% interval) after the budget; into
OUT/metrics.json and OUT/table.md. Each run is its own process, so a peak is that run's.

    # the literature's size (84x84 glyph images, 15 queries, meta-batch 4), on a GPU:
    python benchmarks/es/resnet12.py --device cuda --steps 500 --seeds 0,1,2 \
        --out benchmarks/es/resnet12
    # REDUCED size on a CPU (defaults there: 32x32 images, 5 queries, meta-batch 1):
    python benchmarks/es/resnet12.py --device cpu --steps 20 --seeds 0 --out /tmp/resnet12

Methods: ``esj_authors`` (ESJ with the authors' unit direction per tensor), ``esj``
(gaussian directions), ``direct`` (the ∇_x f term alone), ``itd``, ``cg`` or any registered
name, each with the task's method defaults; ``init`` scores the untrained x0.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bilevel as bl
from bilevel.solve import peak_memory_mb
from bilevel.tasks.few_shot import evaluate, few_shot

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "esj_authors": ("esj", {"distribution": "sphere_per_tensor"}),
}
FULL = {"image_size": 84, "n_query": 15, "meta_batch": 4, "episodes": 600}
REDUCED = {"image_size": 32, "n_query": 5, "meta_batch": 1, "episodes": 50}
REDUCED_NOTE = " — REDUCED SIZE (full size: 84x84 as mini-ImageNet, 15 queries, meta-batch 4)"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the torch threads a run uses."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"CPU {names[0] if names else model} ({torch.get_num_threads()} torch thread(s))"


def size_line(run: dict[str, Any]) -> str:
    """The protocol in words, with REDUCED SIZE said when it is smaller than the full size."""
    reduced = any(run[k] < FULL[k] for k in ("image_size", "n_query", "meta_batch"))
    data = run["root"] or "the generated glyph set ({} x {} x {})".format(*run["glyphs"])
    return (
        f"ResNet-12 (64-160-320-640), 5-way 5-shot, {run['n_query']} queries per class, "
        f"meta-batch {run['meta_batch']}, {run['image_size']}x{run['image_size']} images"
        + (REDUCED_NOTE if reduced else "")
        + f", {run['steps']} outer steps, {run['episodes']} meta-test episodes; data: {data}"
    )


def run_one(run: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) run in this process: meta-train for ``steps`` outer steps, test."""
    torch.set_num_threads(run["threads"])
    device = run["device"]
    task = few_shot(
        form="feature",
        backbone="resnet12",
        root=run["root"],
        n_way=5,
        k_shot=5,
        n_query=run["n_query"],
        meta_batch=run["meta_batch"],
        image_size=run["image_size"],
        n_alphabets=run["glyphs"][0],
        n_characters=run["glyphs"][1],
        n_drawings=run["glyphs"][2],
        seed=run["seed"],
        device=device,
    )
    label = run["method"]
    row: dict[str, Any] = {
        "method": label,
        "seed": run["seed"],
        "device": device_name(device),
        "image_size": run["image_size"],
        "n_query": run["n_query"],
        "meta_batch": run["meta_batch"],
        "backbone_parameters": task.metadata["backbone_parameters"],
        "head_curvature": task.metadata["head_curvature"],  # L at x0; inner_lr = 1/L
        "memory": "cuda max allocated" if device.startswith("cuda") else "peak RSS",
        "baseline_memory_mb": round(peak_memory_mb(task.x0), 1),
    }
    x = task.x0
    if label != "init":
        name, extra = VARIANTS.get(label, (label, {}))
        options = task.method_options(name, **extra)
        method = bl.method(name, **options)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = bl.solve(task.problem, task.x0, None, method, steps=run["steps"],
                          outer_optimizer="adam", outer_lr=task.solve_defaults["outer_lr"],
                          seed=run["seed"], log_every=run["steps"])  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        last = result.history[-1]
        x = result.x
        row.update({
            "options": {k: v for k, v in options.items() if isinstance(v, (int, float, str))},
            "steps": run["steps"],
            "seconds_per_step": last["seconds"] / run["steps"],  # method + outer update (wall)
            "wall_seconds_per_step": wall / run["steps"],  # the whole solve, wall clock
            "cpu_seconds_per_step": cpu / run["steps"],  # the whole solve, process time
            "peak_memory_mb": round(last["peak_memory_mb"], 1),
            "upper_loss": last["upper_loss"],
            "oracles": last["oracles"],
        })  # fmt: skip
    mean, ci95 = evaluate(task, x, episodes=run["episodes"], split="test")
    row.update({"test_accuracy": mean, "ci95": ci95})
    if not device.startswith("cuda"):
        row["peak_rss_mb_total"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def table(rows: list[dict[str, Any]], header: str) -> str:
    """Medians over seeds per method; accuracy as mean over seeds ± the mean 95% half-width."""
    lines = [
        header,
        "",
        f"Device: {rows[0]['device']}. Peak memory: {rows[0]['memory']} (MB).",
        "",
        "| method | seeds | s / outer step (wall) | CPU s / outer step | peak memory MB "
        "| upper loss (last step's batch) | test accuracy % |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == label]

        def median(key: str, fmt: str, group: list[dict[str, Any]] = group) -> str:
            values = [r[key] for r in group if key in r]
            return format(statistics.median(values), fmt) if values else "—"

        acc = statistics.mean(r["test_accuracy"] for r in group)
        ci = statistics.mean(r["ci95"] for r in group)
        lines.append(
            f"| {label} | {len(group)} | {median('seconds_per_step', '.3f')} | "
            f"{median('cpu_seconds_per_step', '.3f')} | {median('peak_memory_mb', '.0f')} | "
            f"{median('upper_loss', '.4f')} | {acc:.2f} ± {ci:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default 84 on cuda, 32 on cpu")
    parser.add_argument("--n-query", type=int, default=None)
    parser.add_argument("--meta-batch", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=None, help="meta-test episodes")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (cuda 500, cpu 20)")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--methods", default="init,esj_authors,esj,itd,cg")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--root", default=None, help="Omniglot-layout folder (default: glyphs)")
    parser.add_argument("--glyphs", default="20,20,20",
                        help="alphabets,characters,drawings of the generated glyph set")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/es/resnet12"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one run, in its own process
        print(json.dumps(run_one(json.loads(args.child))), flush=True)
        return
    sizes = FULL if args.device.startswith("cuda") else REDUCED
    common = {
        "device": args.device,
        "image_size": args.image_size or sizes["image_size"],
        "n_query": args.n_query or sizes["n_query"],
        "meta_batch": args.meta_batch or sizes["meta_batch"],
        "episodes": args.episodes or sizes["episodes"],
        "steps": args.steps or (500 if args.device.startswith("cuda") else 20),
        "threads": args.threads,
        "root": args.root,
        "glyphs": [int(n) for n in args.glyphs.split(",")],
    }
    if len(common["glyphs"]) != 3:
        parser.error("--glyphs needs three counts: alphabets,characters,drawings")
    header = size_line(common)
    print(header, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label in args.methods.split(","):
            run = {**common, "method": label, "seed": seed}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(run)],
                                  check=True, stdout=subprocess.PIPE, text=True)  # fmt: skip
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
            metrics = {"protocol": header, "settings": common, "rows": rows}
            (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
            (args.out / "table.md").write_text(table(rows, header))
    print(table(rows, header))


if __name__ == "__main__":
    main()
