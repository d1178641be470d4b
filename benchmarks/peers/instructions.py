"""Instructions per outer step under valgrind's callgrind: a timing that machine noise cannot move.

Seconds per step on a shared or throttling CPU wander by ±5 % from round to round (the
README's 2026-12-06 run), more than the differences this benchmark is after. Callgrind counts
the instructions the process executes, which do not depend on what else the machine is doing:
the same program on the same inputs gave the same counts to 1e-4 in two runs. One process
runs every implementation and method; before and after each one's timed steps it calls
``os.getppid()``, and ``--dump-before=getppid`` makes callgrind write the counts since the
previous call, so each block of steps gets its own exact total.

    python benchmarks/peers/instructions.py --steps 2 --warmup 1    # default --steps 3 --warmup 2

needs ``valgrind`` (Debian package); under it an outer step takes about 2 minutes, so the
command above (hand-written and bilevel, 3 methods) ran 40 minutes and the defaults take about
an hour; ``--only`` adds peers that are installed. Writes
``instructions.md`` and ``instructions.json`` beside this file (``--out-dir`` elsewhere).
``--cache-sim`` adds callgrind's cache simulation (about 1.5× slower): first-level (D1) and
last-level (LL) data-cache misses per step beside the instructions; on a last level as large
as this machine reports (256 MB) an LL miss is a first touch of memory the step had not used
before, which a heap that keeps growing pays and a steady one does not. ``--methods`` picks
methods.
Instructions are not seconds (a vectorised matrix product does much work per instruction; a
Python-level bookkeeping line few), so the table is a check on *extra work*, beside the timed
table, not a replacement for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from protocol import METHODS

HERE = Path(__file__).parent
SUMMARY = re.compile(r"^summary:\s+([\d ]+)$", re.MULTILINE)
EVENTS = re.compile(r"^events:\s+(.+)$", re.MULTILINE)
# reported event -> the callgrind events it sums
REPORTED = {"instructions": ("Ir",), "D1 misses": ("D1mr", "D1mw"), "LL misses": ("DLmr", "DLmw")}


def child(ids: list[str], methods: list[str], warmup: int, steps: int) -> None:
    """Under callgrind: for each method and implementation, warm-up steps, a marker, the
    counted steps, a marker. Prints the blocks' labels in order, one per line."""
    import torch
    from protocol import load_data
    from run import load_class

    torch.set_num_threads(1)
    data = load_data()
    for method in methods:
        for impl_id in ids:
            cls = load_class(impl_id)
            if method not in cls.methods:
                continue
            impl = cls(method, data)
            for _ in range(warmup):
                impl.step()
            os.getppid()  # dump: everything up to here
            for _ in range(steps):
                impl.step()
            os.getppid()  # dump: exactly the counted steps
            print(f"BLOCK {impl_id}/{method}", flush=True)


def counted_blocks(prefix: Path, labels: list[str]) -> dict[str, dict[str, int]]:
    """Pair the dumps with the labels: dumps 2, 4, 6, ... hold the counted steps (dump 1
    holds start-up and the first warm-up, each odd one the next warm-up). Each block's
    :data:`REPORTED` events that the run recorded."""
    totals = {}
    for index, label in enumerate(labels):
        text = Path(f"{prefix}.{2 * index + 2}").read_text()
        names = EVENTS.search(text).group(1).split()
        values = map(int, SUMMARY.search(text).group(1).split())
        counts = dict(zip(names, values, strict=True))
        totals[label] = {
            name: sum(counts[e] for e in events)
            for name, events in REPORTED.items()
            if events[0] in counts
        }
    return totals


def table(per_step: dict[str, float], baseline: str, event: str) -> str:
    # the labels "impl/method" come in the run's order: methods and implementations in order
    methods = list(dict.fromkeys(k.split("/")[1] for k in per_step))
    ids = list(dict.fromkeys(k.split("/")[0] for k in per_step))
    lines = [f"| {event}: method | " + " | ".join(ids) + " |", "|---" * (len(ids) + 1) + "|"]
    for method in methods:
        base = per_step.get(f"{baseline}/{method}")
        cells = []
        for impl_id in ids:
            n = per_step.get(f"{impl_id}/{method}")
            if n is None:
                cells.append("–")
            else:
                ratio = f" ({n / base:.4f}×)" if base else ""
                count = f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e3:,.1f} k"
                cells.append(f"{count}{ratio}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="handwritten,bilevel")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cache-sim", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ids, methods = args.only.split(","), args.methods.split(",")
    if args.child:
        child(ids, methods, args.warmup, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", "--dump-before=getppid",
                   f"--cache-sim={'yes' if args.cache_sim else 'no'}",
                   f"--callgrind-out-file={prefix}", sys.executable, str(Path(__file__)),
                   "--child", "--only", args.only, "--methods", args.methods,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True)
        labels = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("BLOCK")]
        if done.returncode != 0 or not labels:
            sys.exit(f"callgrind run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        totals = counted_blocks(prefix, labels)
    events = list(next(iter(totals.values())))
    per_step = {e: {label: n[e] / args.steps for label, n in totals.items()} for e in events}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "warmup": args.warmup,
              **{f"{e.replace(' ', '_')}_per_step": v for e, v in per_step.items()}}  # fmt: skip
    (args.out_dir / "instructions.json").write_text(json.dumps(result, indent=1))
    text = "\n".join(table(v, ids[0], e) for e, v in per_step.items())
    (args.out_dir / "instructions.md").write_text(
        f"Per outer step (callgrind; {args.steps} steps after {args.warmup} warm-up; ratio to "
        f"{ids[0]})\n\n{text}"
    )
    print(text, end="")


if __name__ == "__main__":
    main()
