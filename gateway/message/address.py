"""Strict RFC 5321 mailbox parsing for the envelope, refusing every routing trick.

aiosmtpd parses paths leniently (it drops source routes, accepts address literals); a relay must
not. What is refused here is refused with a reason that the RCPT reply can name:
source routes ``@a:b@c``, the ``%`` hack, ``!`` paths, quoted local parts hiding ``@``,
address literals ``[192.0.2.1]``, and anything that is not ``local@domain`` with an LDH domain.

Also :func:`plain_header_address`: the address of a plain From:-like header value, without the
stdlib's address parser, for the values that parser reads verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


# A header value (From:, ...) that the stdlib's address parsers (email.utils.parseaddr and
# getaddresses) read as exactly one address, its addr-spec verbatim: ``Name Words <addr>`` (a
# display name of ASCII letters and digits only) or a bare ``addr``, the addr-spec a dot-atom
# "@" dot-atom, blanks only around it (tests/test_campaign_keys.py pins the equality).
_PLAIN_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*"
PLAIN_HEADER_ADDRESS = re.compile(
    rf"[ \t]*(?:(?:[A-Za-z0-9]+(?:[ \t]+[A-Za-z0-9]+)*[ \t]*)?<({_PLAIN_ADDR_SPEC})>"
    rf"|({_PLAIN_ADDR_SPEC}))[ \t]*\Z")


def plain_header_address(value: str) -> str | None:
    """The one address of a header ``value`` that the stdlib's parsers read as exactly that
    address (see PLAIN_HEADER_ADDRESS), or None: then ask them."""
    m = PLAIN_HEADER_ADDRESS.match(value)
    return None if m is None else m.group(1) or m.group(2)


class AddressError(ValueError):
    """The path is not a plain mailbox this relay will handle; str() is the reason."""


@dataclass(frozen=True)
class Mailbox:
    local: str
    domain: str  # lower-cased

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return len(domain) <= 253 and len(labels) >= 2 and all(_LABEL.match(lbl) for lbl in labels)


def parse_mailbox(path: str) -> Mailbox:
    """Parse the content of an SMTP path (without angle brackets) into a Mailbox."""
    if not path:
        raise AddressError("empty address")
    if path.startswith("@"):
        raise AddressError("source routes are not accepted")
    local, at, domain = path.rpartition("@")
    if not at or not local:
        raise AddressError("address must be local-part@domain")
    if domain.startswith("["):
        raise AddressError("address literals are not accepted")
    if not valid_domain(domain):
        raise AddressError(f"invalid domain {domain!r}")
    if len(local) > 64:
        raise AddressError("local part longer than 64 octets")
    if local.startswith('"'):
        if not _QUOTED.match(local):
            raise AddressError("malformed quoted local part")
        inner = local[1:-1]
        if any(c in inner for c in "@%!:"):
            raise AddressError("quoted local parts containing routing characters are not accepted")
    elif not _DOT_ATOM.match(local):
        raise AddressError("malformed local part")
    if "%" in local:
        raise AddressError("'%' routing is not accepted")
    if "!" in local:
        raise AddressError("'!' (UUCP) paths are not accepted")
    return Mailbox(local, domain.lower())


def split_path(arg: str) -> tuple[str | None, str]:
    """Split a MAIL/RCPT argument into (path content, parameters).

    ``<>`` gives ``""`` (the null reverse-path); an unterminated bracket gives None.
    The content is returned raw, so that parse_mailbox sees routing tricks instead of a
    silently cleaned address.
    """
    arg = arg.strip()
    if arg.startswith("<"):
        end = _closing_bracket(arg)
        if end < 0:
            return None, ""
        return arg[1:end], arg[end + 1:].strip()
    path, _, rest = arg.partition(" ")
    return path, rest.strip()


def _closing_bracket(arg: str) -> int:
    quoted = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


class DomainSet:
    """Domains given as ``example.edu`` (exactly) or ``*.example.edu`` (any subdomain)."""

    def __init__(self, patterns: tuple[str, ...] | list[str]) -> None:
        self.exact = frozenset(p.lower() for p in patterns if not p.startswith("*."))
        self.suffixes = tuple("." + p[2:].lower() for p in patterns if p.startswith("*."))

    def __contains__(self, domain: str) -> bool:
        d = domain.lower()
        return d in self.exact or d.endswith(self.suffixes)

    @staticmethod
    def pattern_error(pattern: str) -> str | None:
        bare = pattern[2:] if pattern.startswith("*.") else pattern
        return None if valid_domain(bare) else f"{pattern!r} is not a domain or *.domain"
