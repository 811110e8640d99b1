"""The CSV files that carry recipient flags between the systems of record and the gateway
(policy IV.C.1.b, IV.C.4.a-b; IV.B.3 exception process item 8: preferences back to the system
of record).

In: one address a row, or, with a column name, a CSV whose first row names the columns (the
name is matched without regard to case or surrounding spaces). UTF-8, with or without a byte
order mark; blank rows are skipped. Each row that is not one well-formed address is reported
with its line number (the line it starts on) and the reason, and left out.

Out: the opt-outs the gateway recorded, one a row, with a header row.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from gateway.policy.flags import normalize
from gateway.message.address import AddressError

if TYPE_CHECKING:
    from gateway.policy.flags import OptOutRecord

EXPORT_COLUMNS = ("address", "scope", "sender", "organization", "recorded_at", "source")


class CSVFormatError(Exception):
    """The file cannot be read as the CSV expected (not the fault of one row)."""


@dataclass
class Rows:
    """What a CSV file held: its addresses (in order, as written) and its bad rows."""

    addresses: list[str] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    header: tuple[int, str] | None = None  # (line, column read) of a recognised header row


# Column names read when a header row is recognised without --column.
ADDRESS_COLUMNS = ("email", "e-mail", "email address", "email_address", "mail", "address")


def _is_header(row: list[str]) -> bool:
    """A first row in which no field could be an address is a header row (column names)."""
    return not any("@" in f for f in row)


def _rows(reader) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, fields) for each row that is not blank."""
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CSVFormatError(f"line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise CSVFormatError(f"after line {reader.line_num}: not UTF-8 text") from None
        if any(f.strip() for f in row):
            yield start, row
        start = reader.line_num + 1


def read_addresses(fh: TextIO, column: str | None = None, delimiter: str = ",",
                   subaddress_separator: str = "+") -> Rows:
    """Read ``fh`` (opened with ``newline=""``); addresses are checked as the gateway will
    hash them (:func:`gateway.policy.flags.normalize`)."""
    out = Rows()
    rows = _rows(csv.reader(fh, delimiter=delimiter))
    index = None
    first = next(rows, None)
    if column is not None:
        if first is None:
            raise CSVFormatError(f"no header row naming the column {column!r}")
        names = [n.strip().lower() for n in first[1]]
        if column.strip().lower() not in names:
            raise CSVFormatError(f"line {first[0]}: no column {column!r} in the header "
                                 f"({', '.join(n for n in names if n) or 'empty'})")
        index = names.index(column.strip().lower())
        first = None
    elif first is not None and _is_header(first[1]):
        names = [n.strip().lower() for n in first[1]]
        present = [n for n in names if n]
        if len(present) == 1:
            column = present[0]
        else:
            column = next((n for n in ADDRESS_COLUMNS if n in names), None)
            if column is None:
                raise CSVFormatError(
                    f"line {first[0]}: a header row ({', '.join(present)}) without an address "
                    f"column ({', '.join(ADDRESS_COLUMNS)}); --column NAME names it")
        index = names.index(column)
        out.header = (first[0], column)
        first = None
    if first is not None:
        rows = itertools.chain([first], rows)
    for line, row in rows:
        if index is None:
            values = [f for f in row if f.strip()]
            if len(values) != 1:
                out.bad.append((line, f"{len(values)} values; expected one address a row "
                                      "(--column NAME reads one column of a wider file)"))
                continue
            value = values[0]
        elif index >= len(row) or not row[index].strip():
            out.bad.append((line, f"no value in column {column!r}"))
            continue
        else:
            value = row[index]
        try:
            normalize(value, subaddress_separator)
        except AddressError as exc:
            shown = value.strip()[:80]
            out.bad.append((line, f"{shown!r} is not an address: {exc}"))
            continue
        out.addresses.append(value.strip())
    return out


def write_optouts(fh: TextIO, records: list[OptOutRecord]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for r in records:
        writer.writerow([r.address, r.scope.kind, r.sender or "", r.organization or "",
                         r.recorded_at, r.source])
