"""Argument checks shared by methods, tasks and the outer loop, so every bad option gets the
same clear message."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import torch


class OptionTypeError(TypeError, ValueError):
    """An option value of the wrong type (e.g. ``warm_start="no"``). Both a ``TypeError`` and a
    ``ValueError``: it is a wrong type, and callers that catch bad values catch it too."""


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_nonnegative(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def reject_unknown_options(kind: str, name: str, given: Iterable[str], known: list[str]) -> None:
    """Raise ``TypeError`` naming the unknown options and listing the ones ``name`` has."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(
            f"{kind} {name!r} has no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(known)}"
        )


def reject_renamed_options(name: str, given: Iterable[str], renamed: Mapping[str, str]) -> None:
    """Raise ``TypeError`` for an option given by an old name, naming its new one."""
    old = sorted(set(given) & set(renamed))
    if old:
        moves = ", ".join(f"{o!r} is now {renamed[o]!r}" for o in old)
        raise TypeError(f"method {name!r}: option {moves} (one meaning per option name)")


# ------------------------------------------------------------------ types from annotations
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every init field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def check_fields(obj: object) -> None:
    """Check every init field of dataclass instance ``obj`` against its annotation (bool, int,
    float, str, None, ``Literal`` choices, lists and dicts; other classes are left to the
    owner's own checks). Raises :class:`OptionTypeError` naming the field."""
    for name, annotation in field_types(type(obj)).items():
        check_type(name, getattr(obj, name), annotation)


def check_type(name: str, value: object, annotation: Any) -> None:
    """Raise :class:`OptionTypeError` if ``value`` does not match ``annotation``."""
    expected = describe_mismatch(value, annotation)
    if expected is not None:
        raise OptionTypeError(f"{name} must be {expected}, got {value!r}")


def _members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def describe_mismatch(value: object, annotation: Any) -> str | None:
    """``None`` if ``value`` fits ``annotation``, else what was expected, in words. A union
    fits when one member does; unknown classes always fit (their owner checks them)."""
    wanted = []
    for member in _members(annotation):
        expected = _mismatch_one(value, member)
        if expected is None:
            return None
        wanted.append(expected)
    return " or ".join(wanted)


def _mismatch_one(value: object, annotation: Any) -> str | None:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return None
    if annotation is type(None):
        return None if value is None else "None"
    if annotation is bool:
        return None if isinstance(value, bool) else "True or False"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "an integer"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if annotation is torch.dtype:
        return None if isinstance(value, torch.dtype) else "a torch dtype (e.g. float32)"
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else "one of " + ", ".join(map(repr, choices))
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "a list"
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if len(args) == 1:
            bad = [v for v in value if describe_mismatch(v, args[0]) is not None]
            if bad:
                return f"a list of {describe_mismatch(bad[0], args[0]).split(' or ')[0]}s"
        return None
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None  # a class of the owner's (an optimizer object, a device): its own check


# ------------------------------------------------------------------ data and devices
def check_reiterable(problem: Any) -> None:
    """Refuse one-shot iterators (generators, ``iter(list)``) as the problem's data: batches
    are cycled and validation peeks at the first one, so such data would be consumed."""
    for which in ("upper_data", "lower_data", "task_data"):
        data = getattr(problem, which, None)
        if data is not None and iter(data) is data:
            raise TypeError(
                f"{which} is a one-shot iterator ({type(data).__name__}): batches are drawn "
                "again and again, so pass a re-iterable such as a list, a tuple or a DataLoader"
            )


def check_device(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` names a device this torch can use."""
    try:
        device = torch.device(value)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {value!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU visible"
        raise ValueError(f"{name}={value!r} is not available: {why}; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{name}={value!r} is not available: {torch.cuda.device_count()} GPU(s) visible"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r} is not available on this machine; use cpu")
