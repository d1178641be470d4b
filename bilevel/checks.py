"""Argument checks shared by methods, tasks and the outer loop, so every bad option gets the
same clear message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number."""
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


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
