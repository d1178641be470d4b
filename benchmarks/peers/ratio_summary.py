"""Per-round ratios of a peer-benchmark run, summarised: how far each median can be trusted.

    python benchmarks/peers/ratio_summary.py benchmarks/peers/<run>/metrics.json

For every implementation and method: the median of the per-round CPU ratios to the
hand-written loop (the table's figure, unrounded), a distribution-free 95 % interval for it
(order statistics of the rounds, no assumption on how they scatter; from 6 rounds on), and how
many rounds fell below 1. Bilevel is also set against each other implementation (the replica
of the hand-written loop, the peers) in the same rounds: the direct comparison of the peers'
ranking.
"""

from __future__ import annotations

import argparse
import json
import statistics
from math import comb
from pathlib import Path

BASELINE = "handwritten"  # every ratio of the benchmark is to this implementation


def median_interval(values: list[float]) -> tuple[float, float] | None:
    """The order statistics (x_(k), x_(n+1−k)) that cover the population median with
    probability ≥ 95 %: k is the largest with P(Binomial(n, ½) < k) ≤ 2.5 % (None below 6
    values, where no such k exists)."""
    n = len(values)
    cover = [k for k in range(1, n // 2 + 1) if sum(comb(n, i) for i in range(k)) <= 0.025 * 2**n]
    if not cover:
        return None
    k, ordered = cover[-1], sorted(values)
    return ordered[k - 1], ordered[n - k]


def summary(times: dict, numerator: str, denominator: str, method: str) -> dict | None:
    """Median, 95 % interval and rounds below 1 of ``numerator``'s per-round CPU seconds over
    ``denominator``'s (None when either did not run ``method``)."""
    top, bottom = times.get(f"{numerator}/{method}"), times.get(f"{denominator}/{method}")
    if top is None or bottom is None:
        return None
    ratios = [a["cpu"] / b["cpu"] for a, b in zip(top, bottom, strict=True)]
    return {
        "median": statistics.median(ratios),
        "interval": median_interval(ratios),
        "below": sum(r < 1 for r in ratios),
        "rounds": len(ratios),
    }


def lines(metrics: dict) -> list[str]:
    """A markdown table: one row per method and ratio (to the hand-written loop, and bilevel's
    head to head)."""
    times = metrics["times"]
    methods = list(dict.fromkeys(key.split("/")[1] for key in times))
    ids = list(dict.fromkeys(key.split("/")[0] for key in times))
    ids.remove(BASELINE)
    pairs = [(impl, BASELINE) for impl in ids]
    if "bilevel" in ids:  # and head to head with each other implementation, round by round
        pairs += [("bilevel", other) for other in ids if other != "bilevel"]
    out = ["| method | ratio | median | 95 % interval | rounds below 1 |", "|---|---|---|---|---|"]
    for method in methods:
        for numerator, denominator in pairs:
            s = summary(times, numerator, denominator, method)
            if s is not None:
                low_high = s["interval"]
                interval = "–" if low_high is None else "[{:.4f}, {:.4f}]".format(*low_high)
                out.append(
                    f"| {method} | {numerator} / {denominator} | {s['median']:.4f} | {interval} "
                    f"| {s['below']} of {s['rounds']} |"
                )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.json")
    args = parser.parse_args(argv)
    print("\n".join(lines(json.loads(args.metrics.read_text()))))


if __name__ == "__main__":
    main()
