"""The message as the checks see it: parsed once, and the facts the decision log takes from it."""

from __future__ import annotations

import asyncio
import email.utils
import re
from datetime import datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from gateway.checks.base import Context
from gateway.message.headers import Field
from gateway.message.indexed import IndexedMessage

# parsed once per message, shared by every check; every entity an IndexedMessage (the stdlib's
# Message with its header look-ups indexed by name: the checks make some thirty a message)
_PARSER = BytesParser(IndexedMessage, policy=compat32)
PARSE_INLINE_MAX = 256 * 1024  # larger messages are parsed off the event loop
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


async def parse(content: bytes, fields: tuple[Field, ...] = ()) -> Message:
    """Parse once for every check; a big message is parsed in a worker thread so that the
    event loop is never held for long (about 2 ms of CPU per 100 KB)."""
    if len(content) <= PARSE_INLINE_MAX:
        return parse_now(content, fields)
    return await asyncio.to_thread(parse_now, content, fields)


def parse_now(content: bytes, fields: tuple[Field, ...] = ()) -> Message:
    """The stdlib's parse of ``content``, the same tree (tests/test_message_parse.py), at less
    cost: a message that is neither multipart nor message/* has its whole body as its payload,
    which the stdlib parser gets by splitting the body into lines and joining them again (most
    of the parse). Such a message's header block is parsed alone and its body set as the
    payload, decoded as the parser decodes it. ``fields``: the header block as
    gateway.message.headers split it (every line a field or a fold), used when it is exactly
    ``content``'s: then no line of it is parsed again."""
    end = content.find(b"\r\n\r\n")
    if end < 0 or content.startswith(b"\r\n"):
        return _PARSER.parsebytes(content)
    head = _from_fields(content, end, fields) if fields else None
    if head is None:
        head = _PARSER.parsebytes(content[:end + 4])
    # (a payload already: the parser saw the body begin before the blank line)
    if head.defects or head.get_payload() or head.get_content_maintype() in ("multipart",
                                                                            "message"):
        return _PARSER.parsebytes(content)
    head.set_payload(content[end + 4:].decode("ascii", "surrogateescape"))
    return head


def _from_fields(content: bytes, end: int, fields: tuple[Field, ...]) -> Message | None:
    """The header-only Message the stdlib parser makes of ``content[:end + 4]``, built from the
    split fields (compat32's header_source_parse: the value after the colon, leading blanks of
    its first line and the final line break dropped, folds kept), or None when the fields are
    not exactly that block."""
    # (Field.raw of each, without the property's call)
    if b"".join([f.name.encode("ascii") + b":" + f.value + b"\r\n" for f in fields]) \
            != content[:end + 2]:
        return None
    msg = IndexedMessage(policy=compat32)
    msg.set_raw_fields([(f.name, f.value.decode("ascii", "surrogateescape").lstrip(" \t")
                         .rstrip("\r\n")) for f in fields])
    msg.set_payload("")
    return msg


def message_id(ctx: Context) -> str:
    """The Message-ID for the log: from the canonical header fields, or (a message refused
    before they were split) found in the raw header block."""
    for f in ctx.header_fields:
        if f.name.lower() == "message-id":  # (Field.is_, without lower-casing the constant)
            return f.value.replace(b"\r\n", b"").decode("utf-8", "replace").strip()[:200]
    if ctx.header_fields:
        return ""
    head = ctx.raw[:ctx.raw.find(b"\r\n\r\n") + 2] if ctx.raw else b""
    m = _MESSAGE_ID.search(head)
    return m.group(1).decode("utf-8", "replace").strip()[:200] if m else ""


def received(ctx: Context, hostname: str, queue_id: str, now: datetime | str) -> bytes:
    """The gateway's Received field, when it is a hop of its own (the SMTP front); ``now``, or
    its RFC 5322 date-time already formatted."""
    proto = "ESMTP" + ("S" if ctx.tls else "") + ("A" if ctx.auth_user else "")
    only = f"\r\n\tfor <{ctx.recipients[0]}>" if len(ctx.recipients) == 1 else ""
    date = now if isinstance(now, str) else email.utils.format_datetime(now)
    # the client's HELO name goes into a field of the gateway's own: printable ASCII only (a
    # NUL, an escape or an 8-bit byte from the client would be the gateway's to answer for)
    helo = "".join(c if "!" <= c <= "~" else "?" for c in (ctx.helo or "unknown")[:255])
    return (f"Received: from {helo} ([{ctx.client_ip}])\r\n\tby {hostname} "
            f"(ecomm-gateway) with {proto} id {queue_id}{only};\r\n\t{date}\r\n").encode()
