"""Rates such as ``30/minute``: a count of messages per period of seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

PERIODS = {"second": 1, "sec": 1, "s": 1, "minute": 60, "min": 60, "m": 60,
           "hour": 3600, "h": 3600, "day": 86400, "d": 86400}


@dataclass(frozen=True, order=True)
class Rate:
    count: int
    period: int  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"30/minute"`` -> Rate(30, 60). ValueError names what is wrong."""
        count, sep, unit = text.strip().partition("/")
        unit = unit.strip().lower()
        if not sep or not count.strip().isdigit() or unit not in PERIODS:
            raise ValueError(f"{text!r} is not a rate such as \"30/minute\" "
                             "(units: second, minute, hour, day)")
        if int(count) < 1:
            raise ValueError(f"{text!r}: the count must be at least 1")
        return cls(int(count), PERIODS[unit])

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def at_most(self, other: Rate | None) -> Rate:
        """The stricter of the two, compared as messages per second."""
        if other is None or self.per_second <= other.per_second:
            return self
        return other

    def scaled(self, factor: float) -> Rate:
        return Rate(max(1, math.floor(self.count * factor)), self.period)

    def __str__(self) -> str:
        name = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(self.period)
        return f"{self.count}/{name}" if name else f"{self.count}/{self.period}s"


def parse_duration(text: str) -> float:
    """``"2h"``, ``"30m"``, ``"90s"``, ``"1d"`` or a number of seconds."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m, 2h or 1d") from None
    if value <= 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return value
