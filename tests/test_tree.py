import pytest
import torch

from bilevel import tree as tr


def test_flatten_roundtrip_and_arithmetic():
    a = {"w": torch.randn(3, 2), "b": torch.randn(4)}
    b = tr.randn_like(a)
    flat = tr.flatten(a)
    assert flat.shape == (10,)
    back = tr.unflatten(flat, a)
    assert all(torch.equal(back[k], a[k]) for k in a)
    assert torch.allclose(tr.dot(a, b), torch.dot(tr.flatten(a), tr.flatten(b)))
    assert torch.allclose(tr.norm(a), tr.flatten(a).norm())
    assert torch.allclose(tr.flatten(tr.axpy(2.0, a, b)), 2 * tr.flatten(a) + tr.flatten(b))
    assert tr.size(a) == 10


def test_clone_does_not_alias():
    a = {"w": torch.ones(2)}
    c = tr.clone(a)
    c["w"] += 1
    assert torch.equal(a["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.ones(2), TypeError, "dict"),
        ({}, ValueError, "empty"),
        ({"w": [1.0]}, TypeError, "torch.Tensor"),
        ({"w": torch.ones(2, dtype=torch.int64)}, TypeError, "floating"),
        ({1: torch.ones(2)}, TypeError, "strings"),
    ],
)
def test_check_tree_errors(value, error, match):
    with pytest.raises(error, match=match):
        tr.check_tree(value, "x")


def test_all_finite():
    assert bool(tr.all_finite({"a": torch.ones(2)}))
    assert not bool(tr.all_finite({"a": torch.tensor([1.0, float("nan")])}))
