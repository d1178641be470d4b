"""Option values from text (``-o KEY=VALUE``, ``-t KEY=VALUE``, config files) read by the type
the option is declared with, not guessed: under YAML 1.1 ``1e-3`` is a string and ``no`` a
bool, so each value is parsed by its annotation (a method's dataclass field, a task factory's
parameter) and a malformed one is an error naming the key.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
import yaml

from bilevel.checks import describe_mismatch

_NONE = ("none", "null", "~")
_BOOLS = {"true": True, "false": False}


class OptionValueError(ValueError):
    """A value that cannot be read as its option's type."""


def parameter_types(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotation of each parameter of ``factory`` (``Any`` where it has none)."""
    try:
        hints = typing.get_type_hints(factory)
    except (NameError, TypeError):
        hints = {}
    return {name: hints.get(name, Any) for name in inspect.signature(factory).parameters}


def coerce_options(
    options: dict[str, Any], types_: dict[str, Any], kind: str
) -> dict[str, Any]:
    """``options`` with every string value read by its declared type (non-strings are kept:
    they came typed from YAML or Python). Unknown keys are kept for the owner to refuse."""
    return {k: coerce(v, types_.get(k, Any), f"{kind} {k}") for k, v in options.items()}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as ``annotation``: strings are parsed (:func:`parse`), lists element-wise."""
    if isinstance(value, str):
        return parse(value, annotation, name)
    members = _members(annotation)
    for member in members:
        if typing.get_origin(member) in (list, tuple) and isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(member) if a is not Ellipsis]
            if len(args) == 1:
                return [coerce(v, args[0], name) for v in value]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and float in members and int not in members:
        return float(value)
    return value


def parse(text: str, annotation: Any, name: str) -> Any:
    """Read ``text`` as ``annotation``; raise :class:`OptionValueError` naming ``name``."""
    text = text.strip()
    members = _members(annotation)
    if any(m is Any for m in members):
        return _guess(text, name)
    for member in sorted(members, key=_precedence):
        try:
            return _parse_one(text, member, name)
        except (ValueError, TypeError):
            continue
    expected = " or ".join(_words(m) for m in members)
    raise OptionValueError(f"{name}: expected {expected}, got {text!r}")


def _members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def _precedence(member: Any) -> int:
    # None and bool first (their spellings are fixed words), str last (it takes anything)
    order = [type(None), bool, int, float, torch.dtype]
    if member in order:
        return order.index(member)
    return 100 if member is str else 50


def _words(member: Any) -> str:
    if member is type(None):
        return "none"
    if member is torch.dtype:
        return "a torch dtype (float32, float64, bfloat16, ...)"
    if member is str:
        return "a string"
    words = describe_mismatch(object(), member)
    return words or getattr(member, "__name__", str(member))


def _parse_one(text: str, member: Any, name: str) -> Any:
    origin = typing.get_origin(member)
    if member is type(None):
        if text.lower() in _NONE:
            return None
        raise ValueError("not none")
    if member is bool:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise ValueError("not a bool")
    if member is int:
        return int(text)
    if member is float:
        return float(text)
    if member is str:
        return text
    if member is torch.dtype:
        dtype = getattr(torch, text.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise ValueError("not a dtype")
    if origin is typing.Literal:
        for choice in typing.get_args(member):
            if str(choice) == text:
                return choice
        raise ValueError("not a choice")
    if origin in (list, tuple) or member in (list, tuple):
        items = _yaml(text, name)
        if not isinstance(items, list):
            raise ValueError("not a list")
        args = [a for a in typing.get_args(member) if a is not Ellipsis]
        if len(args) == 1:
            return [coerce(v, args[0], name) for v in items]
        return items
    if origin is dict or member is dict:
        items = _yaml(text, name)
        if not isinstance(items, dict):
            raise ValueError("not a mapping")
        return items
    # a class without a text form (a device, an optimizer object): the text itself
    return text


def _guess(text: str, name: str) -> Any:
    """No declared type: an integer, a number, true/false, none, a list or mapping, a string."""
    for member in (type(None), bool, int, float):
        try:
            return _parse_one(text, member, name)
        except ValueError:
            pass
    if text.startswith(("[", "{")):
        return _yaml(text, name)
    return text


def _yaml(text: str, name: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise OptionValueError(f"{name}: malformed value {text!r} ({problem})") from None
    return _numbers(value)


def _numbers(value: Any) -> Any:
    """YAML 1.1 leaves ``1e-3`` a string: read such strings inside lists as numbers."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
