"""Policy IV.B.3.c.iii (reporting): the Authentication-Results header field (RFC 8601) that tells
campus mail what the gateway found, and the removal of any incoming one that claims to be ours.

The authserv-id is ``[server] hostname``. An Authentication-Results field already in the message
with that authserv-id is forged or stale and is removed before relaying (RFC 8601 5).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.checks.auth_dkim import DkimResult
    from gateway.checks.auth_dmarc import DmarcResult
    from gateway.checks.auth_spf import SpfResult

HEADER = "Authentication-Results"
_TOKEN = re.compile(r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]+\Z")  # RFC 2045 token


def quote(value: str) -> str:
    """An RFC 2045 value: a token as it is, anything else as a quoted-string."""
    if _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _skip_cfws(text: str, i: int = 0) -> int:
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return i


def authserv_id(value: str) -> str:
    """The authserv-id that begins an Authentication-Results value (comments skipped)."""
    i = _skip_cfws(value)
    if value[i:i + 1] == '"':
        m = re.match(r'"((?:[^"\\]|\\.)*)"', value[i:])
        return re.sub(r"\\(.)", r"\1", m.group(1)) if m else ""
    m = re.match(r"[^\s;()]+", value[i:])
    return m.group(0) if m else ""


def claims(hostname: str) -> Callable[[str, str], bool]:
    """A header predicate: an Authentication-Results field whose authserv-id is ``hostname``."""
    ours = hostname.lower().rstrip(".")

    def predicate(name: str, value: str) -> bool:
        return (name.strip().lower() == HEADER.lower()
                and authserv_id(value.replace("\r\n", "")).lower().rstrip(".") == ours)

    return predicate


def _reason(text: str) -> str:
    return f" reason={quote(text)}" if text else ""


ALIGNMENT_METHOD = "x-ecomm-alignment"  # the gateway's own registration-alignment decision


def _dmarc(r: DmarcResult) -> str:
    """``dmarc=<result> (p=<policy>) header.from=<domain>`` (RFC 7489 11.2, RFC 8601)."""
    comment = []
    if r.policy is not None:
        comment.append(f"p={r.policy}")
        if r.pct < 100:
            comment.append(f"pct={r.pct}")
        if r.disposition is not None and r.disposition != r.policy:
            comment.append(f"dis={r.disposition}")
    note = f" ({' '.join(comment)})" if comment else ""
    reason = _reason(r.reason) if r.result in ("none", "temperror", "permerror") else ""
    return f"dmarc={r.result}{note}{reason} header.from={quote(r.domain or 'unknown')}"


def format_value(hostname: str, spf: Sequence[SpfResult], dkim: Sequence[DkimResult],
                 alignment: str, author: str, alignment_note: str = "",
                 dmarc: DmarcResult | None = None) -> str:
    """The field value: one result per line, folded with CRLF TAB. The gateway's own
    alignment decision (registered domains) is reported as ``x-ecomm-alignment``: only a real
    DMARC evaluation is reported as ``dmarc``."""
    parts = [hostname]
    for r in spf:
        prop = "smtp.mailfrom" if r.identity == "mailfrom" else "smtp.helo"
        reason = r.explanation if r.result not in ("pass", "none") else ""
        parts.append(f"spf={r.result}{_reason(reason)} {prop}={quote(r.domain or 'unknown')}")
    if not dkim:
        parts.append("dkim=none")
    for r in dkim:
        props = ""
        if r.domain:
            props += f" header.d={quote(r.domain)}"
        if r.selector:
            props += f" header.s={quote(r.selector)}"
        if r.b:
            props += f" header.b={quote(r.b)}"
        bits = f" ({r.key_bits}-bit key)" if r.key_bits and r.result == "pass" else ""
        parts.append(f"dkim={r.result}{bits}{_reason(r.reason)}{props}")
    if dmarc is not None:
        parts.append(_dmarc(dmarc))
    note = f" ({alignment_note})" if alignment_note else ""
    parts.append(f"{ALIGNMENT_METHOD}={alignment}{note} header.from={quote(author or 'unknown')}")
    return ";\r\n\t".join(parts)
