"""The business-hours calendar of policy IV.B.3.c.iv ("messages to audiences containing over
15,000 university email addresses may not be sent during business hours").

Business hours are wall-clock hours in one IANA time zone (``[business_hours]`` of gateway.toml):
on the configured week days, from ``start`` (inclusive) to ``end`` (exclusive), except on
``holidays``, which are outside business hours all day. Wall-clock times are compared in the
zone itself, so the hours are right on both sides of a daylight-saving change; the instants a
window opens or closes are computed from the zone's rules for that very date.

Pure functions of the time given: no clock is read here (callers pass the injected clock's now).
"""

from __future__ import annotations

import datetime as dt
import re
import types
import zoneinfo
from collections.abc import Iterable

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_ALIASES = types.MappingProxyType({name.lower(): i for i, name in enumerate(DAY_NAMES)} | {
    full: i for i, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday",
                                      "saturday", "sunday"))})
_HHMM = re.compile(r"(\d{2}):(\d{2})\Z")
_DAY = 86400
_SEARCH_DAYS = 400  # how far ahead an opening or closing is looked for (holidays, odd weeks)


def parse_day(name: str) -> int:
    """``"Mon"``/``"monday"`` (any case) -> 0 .. 6 (Monday = 0). ValueError otherwise."""
    try:
        return _DAY_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"{name!r} is not a day of the week (Mon, Tue, ... Sun)") from None


def parse_hhmm(text: str, *, allow_24: bool = False) -> int:
    """``"08:00"`` -> seconds after local midnight; ``"24:00"`` (end of day) when allowed."""
    m = _HHMM.match(text.strip())
    if m:
        hours, minutes = int(m.group(1)), int(m.group(2))
        if (hours < 24 and minutes < 60) or (allow_24 and hours == 24 and minutes == 0):
            return hours * 3600 + minutes * 60
    upto = "00:00 to 24:00" if allow_24 else "00:00 to 23:59"
    raise ValueError(f"{text!r} is not a time of day HH:MM ({upto})")


def load_zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``; ValueError naming the problem otherwise."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone such as \"America/Denver\" "
                         "(needs the system tz database or the tzdata package)") from None


def _hhmm(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


def _days_text(days: Iterable[int]) -> str:
    """(0, 1, 2, 3, 4) -> "Mon-Fri"; (0, 2, 4) -> "Mon,Wed,Fri"."""
    days = sorted(set(days))
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return ",".join(DAY_NAMES[r[0]] if len(r) == 1 else
                    f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" if len(r) > 2 else
                    f"{DAY_NAMES[r[0]]},{DAY_NAMES[r[1]]}" for r in runs)


class BusinessHours:
    """When business hours are, and when they next close or open."""

    def __init__(self, timezone: str = "America/Denver",
                 days: Iterable[str] = ("Mon", "Tue", "Wed", "Thu", "Fri"),
                 start: str = "08:00", end: str = "17:00",
                 holidays: Iterable[dt.date] = ()) -> None:
        self.zone_name = timezone
        self.zone = load_zone(timezone)
        self.days = frozenset(parse_day(d) for d in days)
        self.start = parse_hhmm(start)
        self.end = parse_hhmm(end, allow_24=True)
        if self.end <= self.start:
            raise ValueError(f"end {end!r} must be later than start {start!r} (same day)")
        self.holidays = frozenset(holidays)

    @classmethod
    def from_config(cls, cfg) -> BusinessHours:
        """From a ``[business_hours]`` config section (gateway.infra.config.BusinessHoursConfig)."""
        return cls(cfg.timezone, cfg.days, cfg.start, cfg.end, cfg.holidays)

    def describe(self) -> str:
        """``"Mon-Fri 08:00-17:00 America/Denver"`` (ASCII: it goes into SMTP replies)."""
        return f"{_days_text(self.days)} {_hhmm(self.start)}-{_hhmm(self.end)} {self.zone_name}"

    def local(self, when: dt.datetime) -> dt.datetime:
        return when.astimezone(self.zone)

    def _business_day(self, day: dt.date) -> bool:
        return day.weekday() in self.days and day not in self.holidays

    def is_open(self, when: dt.datetime) -> bool:
        """Whether ``when`` (timezone-aware) is within business hours."""
        local = self.local(when)
        if not self._business_day(local.date()):
            return False
        wall = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        return self.start <= wall < self.end

    def _instant(self, day: dt.date, wall: int) -> dt.datetime:
        """The first instant (UTC) at which the wall clock of ``day`` reads ``wall`` or later.

        A repeated wall time (autumn) gives its first occurrence; one skipped by a spring-forward
        gap gives the moment the clock jumps over it.
        """
        if wall >= _DAY:
            return self._instant(day + dt.timedelta(days=1), wall - _DAY)
        naive = dt.datetime.combine(day, dt.time(wall // 3600, wall % 3600 // 60, wall % 60))
        first = naive.replace(tzinfo=self.zone, fold=0).astimezone(dt.timezone.utc)
        if first.astimezone(self.zone).replace(tzinfo=None) == naive:
            return first  # exists (fold=0 is the earlier of a repeated time)
        # skipped: fold=1 maps it before the jump, fold=0 after; find the jump between them
        # (zone transitions fall on whole seconds)
        lo = int(naive.replace(tzinfo=self.zone, fold=1).timestamp())
        hi = int(first.timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if dt.datetime.fromtimestamp(mid, self.zone).replace(tzinfo=None) >= naive:
                hi = mid
            else:
                lo = mid
        return dt.datetime.fromtimestamp(hi, dt.timezone.utc)

    def next_close(self, when: dt.datetime) -> dt.datetime | None:
        """When the business hours that ``when`` falls in end (UTC); None when ``when`` is not
        in business hours. An ``end`` of 24:00 followed by a 00:00 start runs on."""
        if not self.is_open(when):
            return None
        day = self.local(when).date()
        for _ in range(_SEARCH_DAYS):
            close = self._instant(day, self.end)
            if close > when and not self.is_open(close):
                return close
            day += dt.timedelta(days=1)
        return None  # open for more than a year: configured hours never close

    def next_open(self, when: dt.datetime) -> dt.datetime | None:
        """When business hours next begin at or after ``when`` (UTC); ``when`` itself if open.
        None if no business day comes within a year (every day a holiday)."""
        if self.is_open(when):
            return when.astimezone(dt.timezone.utc)
        day = self.local(when).date()
        for _ in range(_SEARCH_DAYS):
            if self._business_day(day):
                opens = self._instant(day, self.start)
                if opens > when and self.is_open(opens):
                    return opens
            day += dt.timedelta(days=1)
        return None

    def format(self, when: dt.datetime) -> str:
        """``"Mon 2026-11-02 17:00 MST"``: a local time for an SMTP reply (ASCII)."""
        return self.local(when).strftime("%a %Y-%m-%d %H:%M %Z")
