"""Property tests for the flags CSV reader (gateway.policy.flags_csv): a header row is recognised and
skipped, and never an address row; every address written is read back, in order."""

from __future__ import annotations

import csv
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.flags_csv import ADDRESS_COLUMNS, read_addresses

local = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True).filter(
    lambda s: ".." not in s and not s.endswith("."))
addresses = st.lists(st.builds(lambda l, d: f"{l}@{d}.example.edu", local,
                               st.sampled_from(["students", "staff", "alumni"])),
                     min_size=1, max_size=20)


def written(rows: list[list[str]]) -> io.StringIO:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return io.StringIO(out.getvalue(), newline="")


@settings(max_examples=150, deadline=None)
@given(addrs=addresses, header=st.sampled_from([None, *ADDRESS_COLUMNS, "E-Mail ", "Address"]),
       extra=st.booleans())
def test_header_rows_are_skipped_and_addresses_kept(addrs, header, extra):
    rows = [[a, "x"] if extra else [a] for a in addrs]
    if header is not None:
        rows.insert(0, [header, "name"] if extra else [header])
    if header is None and extra:
        return  # two values a row without a header: bad rows, not this property
    got = read_addresses(written(rows))
    assert got.bad == [] and got.addresses == addrs
    assert (got.header is not None) == (header is not None)
    if header is not None:
        assert got.header == (1, header.strip().lower())


@settings(max_examples=100, deadline=None)
@given(addrs=addresses)
def test_a_first_row_holding_an_address_is_never_a_header(addrs):
    got = read_addresses(written([[a] for a in addrs]))
    assert got.header is None and got.addresses == addrs
