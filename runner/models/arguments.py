"""Checks of the model arguments a config gives: a wrong type (``model.channels=32`` where a
list is needed) fails here with the key, the value and the fix, not as "'int' object is not
iterable" from deep inside a constructor."""

from collections.abc import Sequence
from typing import Any

from runner.errors import ConfigError


def _shown(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(list(value) if isinstance(value, Sequence) else value)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def widths(value: Any, key: str, example: str, allow_empty: bool = True) -> list[int]:
    """A list of layer widths (channels, hidden units), each a positive integer."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if items is None or not all(_is_count(item, 1) for item in items) or (not items and not allow_empty):
        what = "a list of positive integers" if allow_empty else "a non-empty list of positive integers"
        raise ConfigError(f"{key}={_shown(value)} is not a list of layer widths; give {what}, e.g. {key}={example}")
    return [int(item) for item in items]


def count(value: Any, key: str, example: str, minimum: int = 1) -> int:
    """A whole number of at least minimum (a depth, a width, a patch size)."""
    if not _is_count(value, minimum):
        raise ConfigError(f"{key}={_shown(value)} is not a whole number of at least {minimum}; e.g. {key}={example}")
    return int(value)


def probability(value: Any, key: str) -> float:
    """A dropout rate: a number from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key}={_shown(value)} is not a dropout rate; give a number from 0 to 1, e.g. {key}=0.1")
    return float(value)
