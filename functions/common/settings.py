"""Read typed settings from environment variables; each function's settings module builds on this."""

from __future__ import annotations

import os

from functions.common.errors import ConfigurationError

__all__ = ["env_bool", "env_float", "env_int", "env_list", "env_str"]


def env_str(name: str, default: str) -> str:
    """Return the variable NAME, or DEFAULT when it is unset or empty."""
    return os.environ.get(name) or default


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Return the variable NAME as an integer of at least MINIMUM and at most MAXIMUM."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise ConfigurationError(f"{name}={value} is below the minimum of {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name}={value} is above the maximum of {maximum}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0, maximum: float = 100.0) -> float:
    """Return the variable NAME as a number between MINIMUM and MAXIMUM."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from exc
    if not minimum <= value <= maximum:
        raise ConfigurationError(f"{name}={value} is outside {minimum} to {maximum}")
    return value


def env_bool(name: str, default: bool) -> bool:
    """Return the variable NAME as a boolean (1/true/yes or 0/false/no)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean (use true or false)")


def env_list(name: str) -> tuple[str, ...]:
    """Return the comma-separated variable NAME as a tuple of stripped, non-empty items."""
    raw = os.environ.get(name, "")
    return tuple(item.strip() for item in raw.split(",") if item.strip())
