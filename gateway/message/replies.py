"""SMTP replies with enhanced status codes (RFC 3463, RFC 2034, RFC 7372)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")

# Reply text is printable ASCII only: anything else (CR, LF, ESC, NUL, DEL, 8-bit, Unicode line
# separators) that reached a reply from client input is written as \xNN (\uNNNN above 0xff), so
# that no client can make the gateway send a line break, a terminal escape or an extra reply line.
_UNSAFE = re.compile(r"[^\x20-\x7e]")
MAX_LINE = 510  # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF


def _escape_char(m: re.Match) -> str:
    n = ord(m.group())
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape_line(text: str) -> str:
    """One reply line made safe: control and non-ASCII characters escaped, at most 512
    octets with its CRLF."""
    if not (text.isascii() and text.isprintable()):  # (the usual case: nothing to escape)
        text = _UNSAFE.sub(_escape_char, text)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def escape_reply(status: str) -> str:
    """A reply as pushed to the client: its lines are separated by CRLF (only the gateway
    puts CRLF there; a command line read from the client never contains LF), each made safe
    with :func:`escape_line`."""
    return "\r\n".join(escape_line(line) for line in status.split("\r\n"))


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str
    # An upstream's multi-line reply, line by line (:func:`from_upstream`). The gateway's own
    # texts are one line: a CR or LF in them (from client input) is escaped, never a line break.
    lines: tuple[str, ...] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        lines = list(self.lines or [self.text])
        head = [f"{self.code}-{self.enhanced} {escape_line(line)}" for line in lines[:-1]]
        return "\r\n".join([*head, f"{self.code} {self.enhanced} {escape_line(lines[-1])}"])

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


# Enhanced codes for aiosmtpd's built-in replies, which carry none, by reply code.
DEFAULT_ENHANCED = {
    221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.0.0",
    421: "4.3.0", 451: "4.3.0", 452: "4.5.3", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.7.1", 552: "5.3.4",
    553: "5.1.3", 554: "5.3.0", 555: "5.5.4",
}
NO_ENHANCED = {220, 334, 354}  # greeting, AUTH challenge, DATA go-ahead (RFC 2034 section 3)


def add_enhanced(line: str) -> str:
    """Give a one-line reply without an enhanced status code the default one for its code."""
    code_s = line[:3]
    if not code_s.isdigit() or len(line) > 3 and line[3] == "-":
        return line
    code = int(code_s)
    if code in NO_ENHANCED:
        return line
    rest = line[4:]
    first = rest.split(" ", 1)[0]
    if _ENHANCED.match(first):
        return line
    enhanced = DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    return f"{code} {enhanced} {rest}".rstrip()


def from_upstream(code: int, message: str) -> Reply:
    """An upstream server's reply, passed through with its own enhanced code when it has one."""
    lines = message.split("\n")  # aiosmtplib's line separator; nothing else breaks a line
    first, _, rest = lines[0].partition(" ")
    m = _ENHANCED.match(first)
    if m and m.group(1) == str(code)[0]:
        enhanced = first
        lines[0] = rest
        lines = [ln.split(" ", 1)[1] if _ENHANCED.match(ln.split(" ", 1)[0]) and " " in ln
                 else ln for ln in lines]
    else:
        enhanced = DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    return Reply(code, enhanced, "\n".join(lines), lines=tuple(lines))
