"""Small helpers that raise :class:`ConfigError` naming the field, the value and the fix."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from megatron_gr.config.errors import ConfigError


def check_int_range(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> None:
    """Requires an int (a bool is not an int here) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer")
    _check_bounds(name, value, low, high)


def check_float_range(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_exclusive: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a number")
    if value != value:
        raise ConfigError(f"{name}=nan is not allowed")
    if low_exclusive and low is not None and value <= low:
        raise ConfigError(f"{name}={value!r} is out of range: must be > {low}")
    _check_bounds(name, value, None if low_exclusive else low, high)


def check_dropout(name: str, value: Any) -> None:
    """A dropout probability: p in [0, 1). p = 1 would zero every activation (and the
    1 / (1 - p) rescaling divides by zero)."""
    check_float_range(name, value, low=0.0)
    if value >= 1.0:
        raise ConfigError(f"{name}={value!r} is out of range: a dropout probability must be in [0, 1)")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}={value!r} is not allowed: choose one of {allowed}")


def require(condition: bool, message: str) -> None:
    """For constraints between fields: ``message`` names both fields and the fix."""
    if not condition:
        raise ConfigError(message)


def _check_bounds(name, value, low, high) -> None:
    if low is not None and high is not None and not (low <= value <= high):
        raise ConfigError(f"{name}={value!r} is out of range: must be in [{low}, {high}]")
    if low is not None and value < low:
        raise ConfigError(f"{name}={value!r} is out of range: must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{name}={value!r} is out of range: must be <= {high}")
