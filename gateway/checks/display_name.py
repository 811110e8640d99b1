"""Policy IV.B.3.c.i (the sender is who it says it is): the From: field may not show an address
other than its own. ``"president@univ.test" <news@news.univ.test>`` displays the president's
address in most mail clients while every authentication check looks at news@news.univ.test:
refused with 550 5.7.1.

Everything in the From: field but its address counts as shown text: the display name, comments
(``news@x (president@univ.test)``: some clients show those as the name) and RFC 2047 encoded
words (decoded one by one, so one undecodable word cannot hide another), after NFKC
normalization (so a full-width or small commercial at is an at sign). Any address-like
``local@domain.tld`` in that text must be the field's own address (any of them, case
insensitive); when the field has an ``<angle-addr>``, only those are its own addresses, so
``president@univ.test <news@...>`` (invalid syntax, which lenient parsers read as two addresses)
is refused too. The field is read from the canonical header block (``ctx.header_fields``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.utils
import re
import unicodedata
from email import quoprimime

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)\s+(?==\?)")
_ATOM = r"[^\s<>()\[\]\",;:@\\]+"
_ADDRESS = re.compile(rf"{_ATOM}@{_ATOM}(?:\.{_ATOM})+")
_ANGLE_ADDR = re.compile(r"<([^<>]*@[^<>]*)>")
_SHOWN = 60


def _decode_word(m: re.Match) -> str:
    charset, encoding, text = m.group(1).partition("*")[0], m.group(2).lower(), m.group(3)
    try:
        if encoding == "b":
            raw = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            raw = quoprimime.header_decode(text).encode("latin-1", "replace")
    except (binascii.Error, ValueError):
        return m.group(0)
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = "latin-1"
    return raw.decode(codec, "replace")


def shown_text(value: bytes) -> str:
    """The From: field's value as a reader could show it: unfolded, encoded words decoded,
    NFKC-normalized."""
    raw = value.replace(b"\r\n", b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if "=?" in text:  # (neither expression matches without one)
        # adjacent encoded words are one text (RFC 2047 6.2): the white space between them goes
        text = _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub("", text))
    return unicodedata.normalize("NFKC", text)


def _printable(text: str) -> str:
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def foreign_address(value: bytes) -> tuple[str, str] | None:
    """(an address shown in the field, the field's own address) when the field shows an address
    that is not its own; None otherwise."""
    text = shown_text(value)
    # the field's own addresses: its angle-addrs when it has any (everything else is shown
    # text, whatever a lenient parser makes of it), else its bare addr-specs
    own = {a.strip().lower() for a in _ANGLE_ADDR.findall(text)} or {
        addr.lower() for _, addr in email.utils.getaddresses(
            [value.replace(b"\r\n", b"").decode("latin-1")]) if addr}
    for m in _ADDRESS.finditer(text):
        found = m.group(0).strip(".").lower()
        if found not in own:
            return m.group(0), (sorted(own)[0] if own else "")
    return None


class DisplayName(Check):
    name = "display_name"
    stage = Stage.DATA
    description = "the From: display name shows no address other than the From: address"
    uses_message = False

    async def check(self, ctx: Context) -> Verdict:
        for f in ctx.header_fields:
            if not f.is_("From"):
                continue
            found = foreign_address(f.value)
            if found is not None:
                shown, own = found
                return reject(550, "5.7.1", f"The From: field shows the address "
                              f"{_printable(shown)}, which is not its own address"
                              f"{' ' + _printable(own) if own else ''}; a display name may not "
                              "name another address", "display_name_address")
        return ACCEPT
