"""Box projection of the outer variable: the helper, solve's use of it, and the CLI flag."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import bilevel as bl
from bilevel.bench import RunConfig
from bilevel.cli import main
from bilevel.projections import parse_box
from bilevel.tasks.lls_toy import lls_toy


def test_box_clamps_every_leaf_in_place():
    x = {"a": torch.tensor([-3.0, 0.5, 7.0]), "b": torch.tensor([[2.5]], dtype=torch.float64)}
    a = x["a"]
    bl.box(-1.0, 2.0)(x)
    assert x["a"] is a
    torch.testing.assert_close(x["a"], torch.tensor([-1.0, 0.5, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(x["b"], torch.tensor([[2.0]], dtype=torch.float64), rtol=0, atol=0)
    one_sided = {"a": torch.tensor([-5.0, 5.0])}
    bl.box(0.0, math.inf)(one_sided)
    torch.testing.assert_close(one_sided["a"], torch.tensor([0.0, 5.0]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [((2.0, 1.0), "lower <= upper"), ((math.nan, 1.0), "lower bound"), (("0", 1.0), "lower")],
)
def test_bad_bounds_raise(bounds, message):
    with pytest.raises(ValueError, match=message):
        bl.box(*bounds)


def test_parse_box():
    assert parse_box("-100,100") == [-100.0, 100.0]
    assert parse_box([0, 1]) == [0.0, 1.0]
    for bad in ("1", "a,b", "1,2,3", [1.0], "3,1"):
        with pytest.raises(ValueError, match="box"):
            parse_box(bad)
    assert RunConfig(task="lls_toy", method="bda", box="0,1").box == [0.0, 1.0]


def test_solve_projects_after_every_outer_step():
    task = lls_toy(dim=3)
    method = bl.method("bda", **task.method_options("bda", mu=0.99, s_u=1.0))
    seen = []
    result = bl.solve(
        task.problem, task.x0, task.y0, method, steps=20, outer_optimizer="sgd", outer_lr=0.5,
        project=bl.box(-100.0, 0.8),
        callbacks=[lambda ctx: seen.append(float(ctx.x["x"].max()))],
    )  # fmt: skip
    assert max(seen) <= 0.8
    # unconstrained BDA reaches x* = 1 here; the box holds it at its face
    torch.testing.assert_close(result.x["x"], torch.full((3,), 0.8, dtype=torch.float64))


def test_cli_box_flag(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "lls_toy", "--method", "bda", "--steps", "20", "--box=-100,0.8",
            "-o", "mu=0.99", "-o", "s_u=1.0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"]["box"] == [-100.0, 0.8]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["distance"] == pytest.approx(0.2, abs=1e-9)
    assert (
        main(["run", "lls_toy", "--method", "bda", "--box=3,1", "--out", str(tmp_path / "b")]) == 2
    )
    assert "box needs lower <= upper" in capsys.readouterr().err
