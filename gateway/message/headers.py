"""The one canonical header block of a message: split once, byte for byte, or refused.

Every reader of a message's header fields (the checks, the forged Authentication-Results
stripper, the stdlib MIME parser, campus mail) must see the same fields. Parsers disagree only
on input that is not plain RFC 5322 syntax, so such input is refused (``550 5.6.0`` naming the
problem), never repaired:

- a bare CR or LF anywhere in the header block (aiosmtplib, the stdlib parser and most MTAs end
  a line there; a CRLF-only splitter does not), and a NUL;
- a line that is neither ``field-name ":" ...`` (field-name: printable ASCII but ``:``) nor a
  continuation (starting with SP or HTAB): e.g. ``From : x`` (obsolete white space before the
  colon: the stdlib drops such a line as an mbox separator while other readers see a second
  From), an ``mbox From_`` line, a line without a colon, 8-bit bytes in a field name;
- a continuation line of white space only (some readers end the header block there), and a
  header block that starts with one;
- more than one of a field RFC 5322 3.6 allows at most once (``SINGLE``), and more than one
  top-level MIME-Version / Content-Type / Content-Transfer-Encoding / Content-Disposition:
  which one counts depends on the reader.

:func:`split` (syntax) and :func:`check_unique` (repeated fields) work on the raw message; :func:`check_field` and :func:`check_unique` also
work on fields given one by one (a milter front gets them from the MTA that way).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CRLF = b"\r\n"
_FIELD = re.compile(rb"([!-9;-~]+):")  # RFC 5322 3.6.8 field-name ":"
_OBS_FIELD = re.compile(rb"[!-9;-~]+[ \t]+:")  # RFC 5322 4.5.3 obs-optional: WSP before ":"
_SHOWN = 40  # characters of a field name quoted in a reply

# RFC 5322 3.6 (the table in 3.6): fields that may occur at most once in a message.
SINGLE = ("Date", "From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Message-ID", "In-Reply-To",
          "References", "Subject")
# RFC 2045/2183 fields of the top-level entity: two of them and readers pick different ones.
SINGLE_MIME = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition")
_SINGLE = {n.lower(): n for n in (*SINGLE, *SINGLE_MIME)}


class HeaderError(ValueError):
    """The header block cannot be read one way only; ``text`` says why (for the reply)."""

    def __init__(self, text: str, reason: str, code: int = 550, enhanced: str = "5.6.0") -> None:
        super().__init__(text)
        self.text, self.reason, self.code, self.enhanced = text, reason, code, enhanced


@dataclass(frozen=True)
class Field:
    """One header field, exactly as received: ``name`` as written, ``value`` the bytes after
    the colon up to the field's final CRLF (folds kept as CRLF + WSP)."""

    name: str
    value: bytes

    @property
    def raw(self) -> bytes:
        return self.name.encode("ascii") + b":" + self.value + CRLF

    def unfolded(self) -> str:
        """The value with folds removed (RFC 5322 2.2.3), 8-bit bytes as latin-1 characters."""
        return self.value.replace(CRLF, b"").decode("latin-1")

    def is_(self, name: str) -> bool:
        return self.name.lower() == name.lower()


@dataclass(frozen=True)
class HeaderBlock:
    fields: tuple[Field, ...]
    body: bytes  # after the empty line; b"" when there is none
    separated: bool  # the header block ended with an empty line (else the message has no body)

    def assemble(self, fields: Iterable[Field] | None = None) -> bytes:
        """The message again, with ``fields`` (default: its own) as its header block."""
        head = b"".join(f.raw for f in (self.fields if fields is None else fields))
        return head + (CRLF + self.body if self.separated else b"")

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.is_(name)]


def _shown(name: bytes | str) -> str:
    text = name.decode("latin-1") if isinstance(name, bytes) else name
    text = "".join(c if " " < c <= "~" else "?" for c in text)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _line_problem(line: bytes, where: str) -> None:
    if b"\r" in line or b"\n" in line:
        what = "LF" if b"\r" not in line else "CR" if b"\n" not in line else "CR and LF"
        raise HeaderError(f"Bare {what} in the header block ({where}); lines must end with "
                          "CRLF", "header_bare_newline")
    if b"\0" in line:
        raise HeaderError(f"NUL character in the header block ({where})", "header_nul")


def check_field(name: str | bytes, value: bytes, eol: bytes = CRLF) -> None:
    """Check one field given as name and value (folded lines separated by ``eol``: CRLF in a
    message, LF where an MTA hands fields over one by one); HeaderError when it is not plain
    RFC 5322 syntax."""
    raw_name = name.encode("latin-1") if isinstance(name, str) else name
    if _FIELD.fullmatch(raw_name + b":") is None:
        if re.fullmatch(rb"[!-9;-~]+[ \t]+", raw_name):
            raise HeaderError(f'White space between the field name "{_shown(raw_name.strip())}" '
                              "and its colon (obsolete syntax that readers disagree on)",
                              "header_space_before_colon")
        raise HeaderError(f'"{_shown(raw_name)}" is not a header field name', "header_bad_name")
    shown = f"field {_shown(raw_name)}"
    lines = value.split(eol)
    for i, line in enumerate(lines):
        _line_problem(line, shown)
        if i and (line[:1] not in (b" ", b"\t")):
            raise HeaderError(f"A line of {shown} is neither a field nor a continuation",
                              "header_bad_line")
        if i and not line.strip(b" \t"):
            raise HeaderError(f"A continuation line of {shown} holds only white space",
                              "header_blank_continuation")


def check_unique(names: Iterable[str]) -> None:
    """HeaderError (naming the field) when a field that may occur at most once occurs twice."""
    lowered = [n.lower() for n in names]
    if len(set(lowered)) == len(lowered):
        return  # no name twice (most messages)
    counts = Counter(lowered)
    for lower, proper in _SINGLE.items():
        if counts[lower] > 1:
            raise HeaderError(f"The message has {counts[lower]} {proper} fields; at most one is "
                              "allowed (RFC 5322 3.6)", "header_duplicate")


def count(names: Iterable[str], name: str) -> int:
    lower = name.lower()
    return sum(1 for n in names if n.lower() == lower)


def split(raw: bytes) -> HeaderBlock:
    """The header fields of ``raw`` with their exact bytes, and its body; HeaderError when the
    block is not plain RFC 5322 syntax (see :func:`check_unique` for repeated fields).
    ``assemble()`` of the result is ``raw`` again, byte for byte."""
    if raw.startswith(CRLF):
        return HeaderBlock((), raw[2:], True)
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        head, body, separated = raw[:end + 2], raw[end + 4:], True
    else:
        head, body, separated = raw, b"", False
        if head and not head.endswith(CRLF):
            _line_problem(head, "its last line")
            raise HeaderError("The header block does not end with CRLF", "header_bad_line")
    lines = head[:-2].split(CRLF) if head else []
    # one look at the whole block for bare CR/LF and NUL; line by line only to name the line
    pairs = head.count(CRLF)
    clean = head.count(b"\r") == pairs == head.count(b"\n") and b"\0" not in head
    fields: list[tuple[bytes, list[bytes]]] = []
    for number, line in enumerate(lines, 1):
        if not clean:
            _line_problem(line, f"line {number}")
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise HeaderError("The header block starts with a continuation line",
                                  "header_bad_line")
            if not line.strip(b" \t"):
                raise HeaderError(f"A continuation line (line {number}) holds only white space",
                                  "header_blank_continuation")
            fields[-1][1].append(line)
            continue
        m = _FIELD.match(line)
        if m is None:
            if _OBS_FIELD.match(line):
                raise HeaderError(f'White space between the field name '
                                  f'"{_shown(line.split(b":")[0].strip())}" and its colon '
                                  f"(line {number}; obsolete syntax that readers disagree on)",
                                  "header_space_before_colon")
            raise HeaderError(f"A line in the header block is not a header field (line "
                              f"{number})", "header_bad_line")
        fields.append((m.group(1), [line[m.end():]]))
    return HeaderBlock(tuple(Field(name.decode("ascii"), CRLF.join(parts))
                             for name, parts in fields), body, separated)


def check_body(body: bytes) -> None:
    """HeaderError when the body holds a bare CR or LF (RFC 5321 2.3.8: the relay would send
    CRLF instead, so campus mail would get other bytes than were judged) or a NUL (not allowed
    without BINARYMIME, RFC 6152, and read differently by different MTAs)."""
    pairs = body.count(CRLF)
    if body.count(b"\r") != pairs or body.count(b"\n") != pairs:
        raise HeaderError("Bare CR or LF in the message body; lines must end with CRLF "
                          "(RFC 5321 2.3.8)", "body_bare_newline")
    if b"\0" in body:
        raise HeaderError("NUL character in the message body", "body_nul")


def fields_of(pairs: Sequence[tuple[str, bytes]], eol: bytes = CRLF) -> tuple[Field, ...]:
    """Fields handed over one by one (name, value): checked as :func:`split` checks a block,
    folds normalized to CRLF. HeaderError when any is refused."""
    for name, value in pairs:
        check_field(name, value, eol)
    check_unique(name if isinstance(name, str) else name.decode("latin-1") for name, _ in pairs)
    return tuple(Field(n if isinstance(n, str) else n.decode("ascii"), v.replace(eol, CRLF))
                 for n, v in pairs)
