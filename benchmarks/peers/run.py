"""Peer benchmark: this library, a hand-written torch.autograd loop, TorchOpt, BOAT, Betty and
higher on FashionMNIST hyper-cleaning (protocol in protocol.py and README.md).

    python benchmarks/peers/run.py [--rounds 3] [--steps 20] [--warmup 2]

1. Correctness: the first hypergradient of every implementation against the hand-written loop
   run in float64 (relative error; above 1e-3 the implementation is marked wrong).
2. Timing: ``--rounds`` interleaved rounds; in each, every implementation is built afresh
   behind heap padding of random size (a fresh allocation layout per run), runs ``--warmup``
   untimed outer steps, then ``--steps`` timed ones (CPU seconds from ``time.process_time``,
   wall from ``time.perf_counter``). The implementations' order rotates from round to round.
   Ratios are to the hand-written loop in the same round; the table gives their median over
   rounds. ``handwritten_replica`` times the hand-written loop a second time: its ratio (an A/A
   comparison) is the resolution of the others.
3. Op counts: one outer step under ``torch.profiler`` (after a warm-up step): aten::mm and
   aten::addmm calls with a 5000-row operand (the training or validation data).
4. Memory: each implementation in its own process; the peak resident set (VmHWM, reset through
   /proc/self/clear_refs after one warm-up step) over two outer steps.

Writes ``table.md`` and ``metrics.json`` in ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from protocol import METHODS, N_TRAIN, Data, Implementation, difference_to_task, load_data
from ratio_summary import BASELINE, summary
from report import write_report

HERE = Path(__file__).resolve().parent
WRONG = 1e-3  # relative error of a float32 hypergradient above which it is marked wrong
# id -> (module, class); the order is the tables' column order
IMPLEMENTATIONS = {
    "handwritten": ("impl_handwritten", "HandWritten"),
    "handwritten_replica": ("impl_handwritten", "HandWrittenReplica"),
    "bilevel": ("impl_bilevel", "Bilevel"),
    "torchopt": ("impl_torchopt", "TorchOpt"),
    "boat": ("impl_boat", "Boat"),
    "betty": ("impl_betty", "Betty"),
    "betty_patched": ("impl_betty", "BettyPatchedCG"),
    "higher": ("impl_higher", "Higher"),
}
# tensors of random size (up to 64 KB each) allocated before each timed implementation is built
PADDING_TENSORS = 8


def load_class(impl_id: str) -> type[Implementation]:
    module, name = IMPLEMENTATIONS[impl_id]
    return getattr(importlib.import_module(module), name)


def available(ids: list[str]) -> tuple[dict[str, type[Implementation]], dict[str, str]]:
    """The implementation classes that import, and why the others do not."""
    classes, missing = {}, {}
    for impl_id in ids:
        try:
            classes[impl_id] = load_class(impl_id)
        except ImportError as err:
            missing[impl_id] = f"not installed ({err})"
    return classes, missing


def relative_error(hg: torch.Tensor, reference: torch.Tensor) -> float:
    return float((hg.double() - reference).norm() / reference.norm())


def check(classes, data: Data, data64: Data) -> dict:
    """First hypergradient of each implementation vs the float64 hand-written one."""
    mismatch = difference_to_task(data64)
    if mismatch > 1e-12:
        raise AssertionError(
            f"protocol.py's losses differ from the hyper_cleaning task's: {mismatch}"
        )
    reference_class = load_class(BASELINE)
    out = {}
    for method in METHODS:
        ref = reference_class(method, data64)
        ref.step()
        for impl_id, cls in classes.items():
            if method not in cls.methods:
                continue
            impl = cls(method, data)
            impl.step()
            err = relative_error(impl.hypergradient, ref.hypergradient)
            out[f"{impl_id}/{method}"] = {"relative_error": err, "wrong": err > WRONG}
            print(f"check {impl_id:14s} {method:8s} relative error {err:.2e}", flush=True)
    return out


def heap_padding(seed: int) -> list[torch.Tensor]:
    """Tensors of random sizes to hold while one implementation is built and timed.

    Where an implementation's tensors land on the heap follows from everything allocated
    before it, and the same code in two fixed layouts ran up to 0.5 % apart here (identical
    hand-written loops, interleaved in one process): a fixed layout per implementation would
    bias its ratio as much as the differences the table resolves. Padding drawn afresh per run
    makes the layout random, so it averages out over rounds (Mytkowicz, Diwan, Hauswirth,
    Sweeney, "Producing wrong data without doing anything obviously wrong!", ASPLOS 2009)."""
    rng = random.Random(seed)
    return [torch.empty(rng.randrange(1, 16385)) for _ in range(PADDING_TENSORS)]


def time_steps(cls, method: str, data: Data, warmup: int, steps: int, layout: int = 0) -> dict:
    """CPU and wall seconds per outer step of a fresh ``cls``, built behind the heap padding
    drawn from seed ``layout``."""
    padding = heap_padding(layout)
    impl = cls(method, data)
    for _ in range(warmup):
        impl.step()
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        impl.step()
    out = {
        "cpu": (time.process_time() - cpu) / steps,
        "wall": (time.perf_counter() - wall) / steps,
    }
    if hasattr(impl, "step_counts"):  # the library's own oracle counts, checked in its step
        out["oracle_counts"] = dict(impl.step_counts)
    out["padding_elements"] = sum(t.numel() for t in padding)  # held to here: the layout
    return out


def timing(classes, data: Data, rounds: int, warmup: int, steps: int) -> dict:
    """Per round, per method, per implementation: seconds per outer step."""
    ids = list(classes)
    out: dict = {}
    layouts = random.Random(0)  # one padding seed per run: the same layouts on every rerun
    for r in range(rounds):
        order = ids[r % len(ids) :] + ids[: r % len(ids)]
        for method in METHODS:
            for impl_id in order:
                if method not in classes[impl_id].methods:
                    continue
                layout = layouts.randrange(2**32)
                result = time_steps(classes[impl_id], method, data, warmup, steps, layout)
                out.setdefault(f"{impl_id}/{method}", []).append(result)
                print(
                    f"round {r + 1}/{rounds} {impl_id:14s} {method:8s} "
                    f"cpu {result['cpu']:.4f} s/step  wall {result['wall']:.4f}",
                    flush=True,
                )
    return out


def ratios(times: dict) -> dict:
    """Median over rounds of (CPU s/step) / (hand-written's CPU s/step in the same round)."""
    out = {}
    for key in times:
        impl_id, method = key.split("/")
        ratio = summary(times, impl_id, BASELINE, method)
        if ratio is not None:
            out[key] = ratio["median"]
    return out


def op_counts(classes, data: Data) -> dict:
    """aten::mm + aten::addmm per outer step: with a 5000-row operand, and in all."""
    out = {}
    for method in METHODS:
        for impl_id, cls in classes.items():
            if method not in cls.methods:
                continue
            impl = cls(method, data)
            impl.step()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            ) as prof:
                impl.step()
            products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
            on_data = [e for e in products if any(N_TRAIN in shape for shape in e.input_shapes)]
            out[f"{impl_id}/{method}"] = {"mm_on_data": len(on_data), "mm_all": len(products)}
            print(f"ops   {impl_id:14s} {method:8s} mm+addmm on data {len(on_data)}", flush=True)
    return out


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(impl_id: str, method: str) -> None:
    """In a fresh process: peak resident set over two outer steps, after one warm-up step."""
    torch.set_num_threads(1)
    impl = load_class(impl_id)(method, load_data())
    impl.step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_mb("VmRSS")
    impl.step()
    impl.step()
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "step_mb": peak - before}))


def memory(classes) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = {}
    for method in METHODS:
        for impl_id, cls in classes.items():
            if method not in cls.methods:
                continue
            done = subprocess.run(
                [sys.executable, str(HERE / "run.py"), "--memory-child", impl_id, method],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"memory run {impl_id}/{method} failed:\n{done.stderr}")
            out[f"{impl_id}/{method}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"mem   {impl_id:14s} {method:8s} {out[f'{impl_id}/{method}']}", flush=True)
    return out


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "torchvision", "torchopt", "boat-torch", "betty-ml", "higher"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"versions": versions, "cpu": cpu, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed outer steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed outer steps first")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--only", default=",".join(IMPLEMENTATIONS), help="comma-separated implementation ids"
    )
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    ids = [s for s in args.only.split(",") if s]
    unknown = sorted(set(ids) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLEMENTATIONS)}")
    if BASELINE not in ids:
        parser.error(f"--only must include the baseline {BASELINE!r}")

    torch.set_num_threads(1)
    start = time.perf_counter()
    classes, missing = available(ids)
    data, data64 = load_data(torch.float32), load_data(torch.float64)
    phases: dict[str, float] = {}

    def timed(name: str, fn, *fn_args):
        begin = time.perf_counter()
        result = fn(*fn_args)
        phases[name] = time.perf_counter() - begin
        return result

    metrics = {
        "protocol": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
        "environment": environment(),
        "missing": missing,
        "check": timed("check", check, classes, data, data64),
        "times": timed("timing", timing, classes, data, args.rounds, args.warmup, args.steps),
    }
    metrics["ratios"] = ratios(metrics["times"])
    metrics["ops"] = timed("ops", op_counts, classes, data)
    metrics["memory"] = timed("memory", memory, classes)
    metrics["phase_seconds"] = phases
    metrics["seconds_total"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_report(metrics, classes, args.out / "table.md")
    print(f"wrote {args.out / 'table.md'} and metrics.json in {metrics['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
