"""benchmarks/peers: the protocol's losses are the hyper_cleaning task's, and the library's first
hypergradient equals the hand-written float64 loop's for cg, neumann and itd (the peers
themselves need their own environment, benchmarks/peers/requirements.txt)."""

import sys
from pathlib import Path

import pytest
import torch

from bilevel.data.errors import DataNotFoundError

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "peers"))

protocol = pytest.importorskip("protocol")


@pytest.fixture(scope="module")
def data64():
    try:
        return protocol.load_data(torch.float64)
    except DataNotFoundError:
        pytest.skip("FashionMNIST (dataset-fashion-mnist) is not installed")


def test_protocol_losses_are_the_tasks(data64):
    assert protocol.difference_to_task(data64) == 0.0


@pytest.mark.parametrize("method", ["cg", "neumann", "itd"])
def test_bilevel_matches_hand_written_loop(data64, method):
    from impl_bilevel import Bilevel
    from impl_handwritten import HandWritten

    reference, ours = HandWritten(method, data64), Bilevel(method, data64)
    for _ in range(2):  # the second step is warm-started and follows an Adam step
        reference.step()
        ours.step()
        err = (ours.hypergradient - reference.hypergradient).norm()
        assert err <= 1e-10 * reference.hypergradient.norm()


def test_instruction_counts_pair_every_second_dump_with_its_block(tmp_path):
    # instructions.py's reading of callgrind's dumps: dump 1 is start-up and the first warm-up,
    # then each block's counted steps (even dumps) alternate with the next one's warm-up (odd)
    instructions = pytest.importorskip("instructions")
    prefix = tmp_path / "callgrind.out"
    for index, total in enumerate([900, 30, 999, 10, 999, 12], start=1):
        Path(f"{prefix}.{index}").write_text(
            f"version: 1\nevents: Ir\nsummary: {total}\ntotals: {total}\n"
        )
    labels = ["handwritten/cg", "bilevel/cg", "handwritten/itd"]
    assert instructions.counted_blocks(prefix, labels) == {
        "handwritten/cg": {"instructions": 30},
        "bilevel/cg": {"instructions": 10},
        "handwritten/itd": {"instructions": 12},
    }
    text = instructions.table({"handwritten/cg": 2e6, "bilevel/cg": 3e6}, "handwritten", "Ir")
    assert "| cg | 2.0 M (1.0000×) | 3.0 M (1.5000×) |" in text


def test_cache_simulation_reports_first_and_last_level_misses_summed_over_reads_and_writes(
    tmp_path,
):
    instructions = pytest.importorskip("instructions")
    prefix = tmp_path / "callgrind.out"
    events = "events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\n"
    Path(f"{prefix}.1").write_text(events + "summary: 9 9 9 9 9 9 9 9 9\n")
    Path(f"{prefix}.2").write_text(events + "summary: 100 50 20 7 5 3 1 4 2\n")
    assert instructions.counted_blocks(prefix, ["bilevel/cg"]) == {
        "bilevel/cg": {"instructions": 100, "D1 misses": 8, "LL misses": 6}
    }


def test_each_timed_run_is_built_behind_fresh_reproducible_heap_padding():
    run = pytest.importorskip("run")

    def sizes(seed):
        return [t.numel() for t in run.heap_padding(seed)]

    assert sizes(1) == sizes(1)  # a rerun draws the same layouts
    assert sizes(1) != sizes(2)
    assert len(sizes(1)) == run.PADDING_TENSORS and all(1 <= n <= 16384 for n in sizes(1))


def test_the_replica_times_the_hand_written_loop_itself():
    from impl_handwritten import HandWritten, HandWrittenReplica

    run = pytest.importorskip("run")
    assert run.load_class("handwritten_replica") is HandWrittenReplica
    assert HandWrittenReplica.__bases__ == (HandWritten,)
    # it overrides nothing but its column's name: the A/A comparison times the same code
    assert {k for k in vars(HandWrittenReplica) if not k.startswith("__")} == {"library"}


def test_ratio_summary_brackets_the_median_by_order_statistics():
    summary = pytest.importorskip("ratio_summary")
    # n = 30: P(Bin(30, 1/2) <= 9) = 2.1 % <= 2.5 % < P(<= 10): the 10th and 21st values
    assert summary.median_interval([float(v) for v in range(30, 0, -1)]) == (10.0, 21.0)
    assert summary.median_interval([1.0] * 5) is None  # no 95 % interval from 5 rounds
    times = {
        f"{impl}/neumann": [{"cpu": c} for c in cpus]
        for impl, cpus in {
            "handwritten": [2.0] * 6,
            "handwritten_replica": [2.0, 2.0, 2.0, 2.2, 2.2, 2.2],
            "bilevel": [1.0, 1.0, 1.0, 1.0, 4.0, 4.0],
        }.items()
    }
    table = summary.lines({"times": times})
    assert "| neumann | bilevel / handwritten | 0.5000 | [0.5000, 2.0000] | 4 of 6 |" in table
    replica = "| neumann | handwritten_replica / handwritten | 1.0500 | [1.0000, 1.1000] | 0 of 6 |"
    assert replica in table
    assert any(row.startswith("| neumann | bilevel / handwritten_replica | ") for row in table)
