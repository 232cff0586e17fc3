"""Go-style durations (``500ms``, ``5m``, ``1h30m``), as Liftbridge config files write them."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["DurationError", "parse_duration"]

_UNIT_SECONDS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A text that is not a Go duration."""


def parse_duration(text: str) -> float:
    """Parse a Go duration into seconds.

    Accepts what Go's ``time.ParseDuration`` accepts: an optional sign and a sequence of
    decimal numbers with units ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``
    (``"1h30m"``, ``"1.5s"``, ``"-2m"``); ``"0"`` alone needs no unit.

    Raises:
        DurationError: ``text`` is empty, has an unknown unit or a number without a unit.
    """
    original = text
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    if text[:1] in ("+", "-"):
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise DurationError(f"invalid duration {original!r}")
    total = 0.0
    position = 0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise DurationError(
            f"invalid duration {original!r}: use a number with a unit, such as 500ms, 5m or 1h30m"
        )
    return sign * total
