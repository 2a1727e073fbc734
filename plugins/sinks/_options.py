"""Option parsing shared by the built-in sinks (values may arrive as text from the CLI)."""

from __future__ import annotations

from typing import Any

from avatar.errors import ConfigError

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def parse_bitrate(value: int | str, what: str) -> int:
    """``128k``, ``2M``, ``2500000`` → bits per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bits = int(value)
    else:
        text = str(value).strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
        try:
            bits = int(float(text[:-1] if scale != 1 else text) * scale)
        except ValueError:
            raise ConfigError(f"{what} must be a bitrate like 128k, 2M or 2000000, not {value!r}") from None
    if bits <= 0:
        raise ConfigError(f"{what} must be positive, not {value!r}")
    return bits


def as_bool(value: Any, what: str) -> bool:
    """A boolean option that may arrive as text from a command line or a config file."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what} must be true or false, not {value!r}")
