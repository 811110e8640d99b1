"""Milter packets in and out, bounded.

The codec is kilter.protocol's (typed, sans-IO): it packs every response and edit and unpacks
the MTA's events. Three events are decoded here instead: kilter reads HELO and the connect
host name as IDNA (which turns "xn--" labels into Unicode, so SPF would check another name than
the client gave, and fails on an invalid label) and macro values as strict ASCII (a UTF-8 SASL
name would fail the whole packet); here the HELO is kept byte for byte and undecodable bytes
become U+FFFD, so such input is decided on, not crashed on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass

from kilter.protocol import messages as m
from kilter.protocol.buffer import SimpleBuffer
from kilter.protocol.exceptions import InsufficientSpace, UnknownMessage

# Postfix sends the body in chunks of at most 65535 bytes and a header field of at most
# header_size_limit (102400 by default); nothing legitimate comes near this.
MAX_PACKET = 256 * 1024
_LENGTH = struct.Struct("!L")


class BadPacket(Exception):
    """The MTA sent something that is not a milter packet this front accepts; str() says what
    (never the packet's bytes)."""


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str  # "4", "6", or what else the MTA said ("L": unix socket, "U": unknown)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None


@dataclass(frozen=True)
class Helo:
    hostname: str


@dataclass(frozen=True)
class Macros:
    stage: str
    values: dict[str, str]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _cstrings(data: bytes) -> list[bytes]:
    if not data.endswith(b"\0"):
        raise BadPacket("string not NUL-terminated")
    return data[:-1].split(b"\0")


def _connect(data: bytes) -> Connect:
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise BadPacket("connect packet without address family")
    family = chr(rest[0])
    if family not in "46":
        return Connect(_text(host), family, None)
    if len(rest) < 4:
        raise BadPacket("connect packet without port and address")
    (addr,) = _cstrings(rest[3:])[:1] or [b""]
    if addr[:5].lower() == b"ipv6:":  # Sendmail's form; Postfix sends the bare address
        addr = addr[5:]
    try:
        ip = ipaddress.ip_address(addr.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadPacket("connect packet with an invalid address") from None
    if (family == "4") != isinstance(ip, ipaddress.IPv4Address):
        raise BadPacket("connect packet whose address is not of its family")
    return Connect(_text(host), family, ip)


def _macros(data: bytes) -> Macros:
    if not data:
        raise BadPacket("macro packet without a stage")
    stage, body = chr(data[0]), data[1:]
    items = _cstrings(body) if body else []
    if len(items) % 2:
        raise BadPacket("macro packet with a name and no value")
    return Macros(stage, {_text(items[i]).strip("{}"): _text(items[i + 1])
                          for i in range(0, len(items), 2)})


def decode(cmd: int, data: bytes):
    """One packet's command byte and data -> an event (this module's or kilter's)."""
    if cmd == ord("C"):
        return _connect(data)
    if cmd == ord("H"):
        return Helo(_text(_cstrings(data)[0]))
    if cmd == ord("D"):
        return _macros(data)
    frame = _LENGTH.pack(len(data) + 1) + bytes([cmd]) + data
    buf = SimpleBuffer(len(frame))
    buf[:] = frame
    try:
        message, _ = m.Message.unpack(buf)
        message.freeze()  # copy out of the buffer
    except UnknownMessage:
        raise BadPacket(f"unknown command {cmd:#04x}") from None
    except (ValueError, AssertionError, UnicodeError, struct.error, IndexError, StopIteration):
        raise BadPacket(f"malformed packet for command {chr(cmd)!r}") from None
    return message


async def read_event(reader: asyncio.StreamReader, timeout: float):
    """The next event from the MTA; None when it closed the connection cleanly between
    packets. Raises BadPacket, TimeoutError, or IncompleteReadError (closed mid-packet)."""
    async with asyncio.timeout(timeout):
        try:
            head = await reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        (length,) = _LENGTH.unpack(head)
        if length == 0:
            raise BadPacket("empty packet")
        if length > MAX_PACKET:
            raise BadPacket(f"packet of {length} bytes (at most {MAX_PACKET})")
        packet = await reader.readexactly(length)
    return decode(packet[0], packet[1:])


def encode(*messages: m.Message) -> bytes:
    out = bytearray()
    for message in messages:
        size = 1024
        while True:
            buf = SimpleBuffer(size)
            try:
                message.pack(buf)
            except InsufficientSpace:
                size *= 4
                continue
            out += buf[:]
            break
    return bytes(out)
