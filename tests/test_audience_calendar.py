"""The business-hours calendar of policy IV.B.3.c.iv, and the [business_hours] and
[[university.lists]] configuration: edges, weekends, holidays, and both daylight-saving changes
of America/Denver in 2026 (March 8, November 1)."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from gateway.policy.business_hours import BusinessHours
from gateway.infra.config import load_config
from gateway.infra.typed import ConfigError

UTC = dt.timezone.utc
ALL_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture
def hours() -> BusinessHours:
    return BusinessHours()  # Mon-Fri 08:00-17:00 America/Denver


def test_defaults_describe_themselves_in_ascii(hours):
    assert hours.describe() == "Mon-Fri 08:00-17:00 America/Denver"
    assert BusinessHours(days=("Mon", "wednesday", "FRI")).describe() == \
        "Mon,Wed,Fri 08:00-17:00 America/Denver"
    assert BusinessHours(days=("Sat", "Sun", "Mon")).describe().startswith("Mon,Sat,Sun ")
    assert hours.format(utc(2026, 11, 3, 0, 0)) == "Mon 2026-11-02 17:00 MST"


def test_start_is_inclusive_and_end_exclusive(hours):
    # Monday 2026-11-02, MST (UTC-7)
    assert not hours.is_open(utc(2026, 11, 2, 14, 59, 59))  # 07:59:59
    assert hours.is_open(utc(2026, 11, 2, 15, 0))  # 08:00
    assert hours.is_open(utc(2026, 11, 2, 23, 59, 59, 999999))  # 16:59:59.999999
    assert not hours.is_open(utc(2026, 11, 3, 0, 0))  # 17:00 exactly: closed
    assert hours.next_close(utc(2026, 11, 2, 17, 0)) == utc(2026, 11, 3, 0, 0)
    assert hours.next_close(utc(2026, 11, 3, 0, 0)) is None  # not open
    assert hours.next_open(utc(2026, 11, 3, 0, 0)) == utc(2026, 11, 3, 15, 0)  # Tue 08:00
    assert hours.next_open(utc(2026, 11, 2, 14, 0)) == utc(2026, 11, 2, 15, 0)  # same morning
    assert hours.next_open(utc(2026, 11, 2, 17, 0)) == utc(2026, 11, 2, 17, 0)  # open now


def test_weekend_is_outside_business_hours(hours):
    assert not hours.is_open(utc(2026, 11, 7, 17, 0))  # Saturday 10:00
    assert not hours.is_open(utc(2026, 11, 8, 19, 0))  # Sunday 12:00
    # Friday afternoon: closes at 17:00 Friday, opens again Monday 08:00
    friday = utc(2026, 11, 6, 23, 0)  # Fri 16:00 MST
    assert hours.next_close(friday) == utc(2026, 11, 7, 0, 0)
    assert hours.next_open(hours.next_close(friday)) == utc(2026, 11, 9, 15, 0)
    assert hours.format(utc(2026, 11, 9, 15, 0)) == "Mon 2026-11-09 08:00 MST"


def test_a_holiday_is_outside_business_hours_all_day():
    hours = BusinessHours(holidays=[dt.date(2026, 11, 26), dt.date(2026, 11, 27)])
    assert not hours.is_open(utc(2026, 11, 26, 18, 0))  # Thanksgiving, Thu 11:00
    assert not hours.is_open(utc(2026, 11, 27, 15, 0))  # and the Friday after, 08:00
    assert hours.is_open(utc(2026, 11, 25, 18, 0))
    # Wednesday 17:00 -> next opening skips Thu, Fri and the weekend
    assert hours.next_open(utc(2026, 11, 26, 0, 0)) == utc(2026, 11, 30, 15, 0)
    # the holiday is a local date: late Wednesday evening in Denver is already Thursday in UTC
    assert not hours.is_open(utc(2026, 11, 26, 6, 0))


def test_spring_forward_2026_03_08(hours):
    # Friday 2026-03-06 is MST (UTC-7); Monday 2026-03-09 is MDT (UTC-6)
    assert hours.next_close(utc(2026, 3, 6, 17, 0)) == utc(2026, 3, 7, 0, 0)  # 17:00 MST
    assert hours.next_open(utc(2026, 3, 7, 0, 0)) == utc(2026, 3, 9, 14, 0)  # 08:00 MDT
    assert not hours.is_open(utc(2026, 3, 9, 13, 59))  # 07:59 MDT (would be 06:59 MST)
    assert hours.is_open(utc(2026, 3, 9, 14, 0))
    assert hours.is_open(utc(2026, 3, 9, 22, 59))  # 16:59 MDT
    assert not hours.is_open(utc(2026, 3, 9, 23, 0))  # 17:00 MDT
    assert hours.format(utc(2026, 3, 9, 23, 0)) == "Mon 2026-03-09 17:00 MDT"
    # hours that the change cuts short: 01:00-02:30 every day; 02:00 MST jumps to 03:00 MDT
    night = BusinessHours(days=ALL_DAYS, start="01:00", end="02:30")
    assert night.is_open(utc(2026, 3, 8, 8, 59, 59))  # 01:59:59 MST
    assert not night.is_open(utc(2026, 3, 8, 9, 0))  # 03:00 MDT
    assert night.next_close(utc(2026, 3, 8, 8, 30)) == utc(2026, 3, 8, 9, 0)  # at the jump
    late = BusinessHours(days=ALL_DAYS, start="02:30", end="05:00")  # 02:30 never happens
    assert late.next_open(utc(2026, 3, 8, 8, 30)) == utc(2026, 3, 8, 9, 0)  # opens at the jump


def test_fall_back_2026_11_01(hours):
    # Friday 2026-10-30 is MDT (UTC-6); Monday 2026-11-02 is MST (UTC-7)
    assert hours.next_close(utc(2026, 10, 30, 20, 0)) == utc(2026, 10, 30, 23, 0)  # 17:00 MDT
    assert hours.next_open(utc(2026, 10, 30, 23, 0)) == utc(2026, 11, 2, 15, 0)  # 08:00 MST
    assert hours.format(utc(2026, 10, 30, 23, 0)) == "Fri 2026-10-30 17:00 MDT"
    assert not hours.is_open(utc(2026, 11, 2, 14, 0))  # 07:00 MST (would be 08:00 MDT)
    # hours that the change lengthens: 01:00-03:00 every day; 01:00-02:00 happens twice
    night = BusinessHours(days=ALL_DAYS, start="01:00", end="03:00")
    assert night.is_open(utc(2026, 11, 1, 7, 30))  # 01:30 MDT
    assert night.is_open(utc(2026, 11, 1, 8, 30))  # 01:30 MST, an hour later
    assert night.is_open(utc(2026, 11, 1, 9, 59))  # 02:59 MST
    assert night.next_close(utc(2026, 11, 1, 7, 0)) == utc(2026, 11, 1, 10, 0)  # 03:00 MST
    assert night.next_open(utc(2026, 10, 31, 12, 0)) == utc(2026, 11, 1, 7, 0)  # 01:00 MDT


def test_hours_to_midnight_run_on_into_the_next_day():
    hours = BusinessHours(days=("Mon", "Tue"), start="00:00", end="24:00")
    assert hours.next_close(utc(2026, 11, 2, 19, 0)) == utc(2026, 11, 4, 7, 0)  # Wed 00:00
    always = BusinessHours(days=ALL_DAYS, start="00:00", end="24:00")
    assert always.next_close(utc(2026, 11, 2, 19, 0)) is None


def write(tmp_path, text: str):
    path = tmp_path / "gateway.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_business_hours_and_lists_configuration(tmp_path):
    config = load_config(write(tmp_path, """
        [university]
        domains = ["example.edu"]
        [[university.lists]]
        address = "All-Students@example.edu"
        members = 20000
        [[university.lists]]
        address = "staff@example.edu"
        members = 9000
        [business_hours]
        timezone = "America/New_York"
        days = ["mon", "Tuesday"]
        start = "09:30"
        end = "24:00"
        holidays = [2026-12-25]
        large_audience = 10000
        window = "3d"
        [checks.large_audience]
        action = "reject"
        campaign_headers = ["X-Job-ID"]
        size_header = "X-Recipients"
        """))
    assert [(lst.address, lst.members) for lst in config.university.lists] == [
        ("All-Students@example.edu", 20000), ("staff@example.edu", 9000)]
    bh = config.business_hours
    assert (bh.timezone, bh.days, bh.start, bh.end) == ("America/New_York", ("mon", "Tuesday"),
                                                        "09:30", "24:00")
    assert bh.holidays == (dt.date(2026, 12, 25),) and bh.large_audience == 10000
    assert bh.window_seconds == 3 * 86400
    settings = config.check_settings("large_audience")
    assert (settings.action, settings.campaign_headers, settings.size_header) == (
        "reject", ("X-Job-ID",), "X-Recipients")
    defaults = load_config(write(tmp_path, "")).business_hours
    assert (defaults.timezone, defaults.days, defaults.start, defaults.end, defaults.holidays,
            defaults.large_audience, defaults.window_seconds) == (
        "America/Denver", ("Mon", "Tue", "Wed", "Thu", "Fri"), "08:00", "17:00", (), 15000,
        7 * 86400)


@pytest.mark.parametrize("text, key, reason", [
    ('[business_hours]\ntimezone = "Mars/Olympus"\n', "business_hours.timezone",
     "is not an IANA time zone"),
    ('[business_hours]\ndays = ["Mon", "Funday"]\n', "business_hours.days[1]",
     "'Funday' is not a day of the week"),
    ('[business_hours]\ndays = []\n', "business_hours.days", "needs at least one day"),
    ('[business_hours]\nstart = "8am"\n', "business_hours.start", "is not a time of day HH:MM"),
    ('[business_hours]\nstart = "24:00"\n', "business_hours.start", "(00:00 to 23:59)"),
    ('[business_hours]\nend = "07:00"\n', "business_hours.end", "must be later than start"),
    ('[business_hours]\nholidays = ["2026-12-25"]\n', "business_hours.holidays[0]",
     "expected a date (YYYY-MM-DD, unquoted)"),
    ('[business_hours]\nlarge_audience = 0\n', "business_hours.large_audience",
     "must be at least 1"),
    ('[business_hours]\nwindow = "a week"\n', "business_hours.window", "is not a duration"),
    ('[university]\n[[university.lists]]\naddress = "all@gmail.com"\nmembers = 5\n',
     "university.lists[0].address", "is not in a university domain"),
    ('[university]\n[[university.lists]]\naddress = "all@example.edu"\nmembers = 0\n',
     "university.lists[0].members", "must be at least 1"),
    ('[university]\n[[university.lists]]\naddress = "all"\nmembers = 5\n',
     "university.lists[0].address", "address must be local-part@domain"),
    ('[university]\n[[university.lists]]\naddress = "a@example.edu"\nmembers = 5\n'
     '[[university.lists]]\naddress = "A@example.edu"\nmembers = 6\n',
     "university.lists[1].address", "is listed twice"),
    ('[university]\n[[university.lists]]\naddress = "a@example.edu"\n',
     "university.lists[0].members", "required key is missing"),
    ('[checks.large_audience]\naction = "drop"\n', "checks.large_audience.action",
     "'drop' is not one of 'defer' | 'reject'"),
    ('[checks.large_audience]\ncampaign_headers = ["X Campaign"]\n',
     "checks.large_audience.campaign_headers[0]", "is not a header name"),
])
def test_bad_configuration_names_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}: {key}: ")
