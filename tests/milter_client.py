"""A raw milter client (the MTA's side) for protocol-level tests: packets built with
kilter.protocol's codec, or by hand where a test sends what no codec would."""

from __future__ import annotations

import socket
import struct

from kilter.protocol import messages as m
from kilter.protocol.buffer import SimpleBuffer

from gateway.milter.wire import encode

ALL_ACTIONS = m.ActionFlags(0x1FF)
ALL_PROTOCOL = m.ProtocolFlags(0x1FFFFF)


def connect_packet(family: bytes, address: str = "", port: int = 25,
                   hostname: bytes = b"client.test") -> bytes:
    data = hostname + b"\0" + family
    if family in (b"4", b"6"):
        data += struct.pack("!H", port) + address.encode() + b"\0"
    elif family == b"L":
        data += struct.pack("!H", 0) + address.encode() + b"\0"
    return raw(b"C", data)


def macro_packet(stage: bytes, **values: str) -> bytes:
    data = stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
    return raw(b"D", data)


def raw(cmd: bytes, data: bytes) -> bytes:
    return struct.pack("!L", len(data) + 1) + cmd + data


class MilterClient:
    def __init__(self, address: tuple[str, int] | str, timeout: float = 30) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)

    def close(self) -> None:
        self.sock.close()

    def send(self, *packets: bytes | m.Message) -> None:
        self.sock.sendall(b"".join(p if isinstance(p, bytes) else encode(p) for p in packets))

    def read(self) -> m.Message | None:
        """The gateway's next packet; None when it closed the connection."""
        head = self._exactly(4)
        if head is None:
            return None
        (length,) = struct.unpack("!L", head)
        body = self._exactly(length)
        buf = SimpleBuffer(length + 4)
        buf[:] = head + body
        message, _ = m.Message.unpack(buf)
        message.freeze()
        return message

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    no_reply: tuple[type, ...] = ()  # events the gateway answers not (negotiated NR flags)

    def ask(self, *packets) -> m.Message | None:
        """Send, then read the one answer (a Continue, unread, for an event negotiated to take
        no answer)."""
        self.send(*packets)
        if len(packets) == 1 and isinstance(packets[0], self.no_reply):
            return m.Continue()
        return self.read()

    def until_answer(self, *packets) -> list[m.Message]:
        """Send, then read every packet up to and including the final answer of an
        end-of-message (edits first, then continue/accept/reject/discard/tempfail/reply)."""
        self.send(*packets)
        out = []
        while True:
            message = self.read()
            if message is None:
                return out
            out.append(message)
            if isinstance(message, (m.Continue, m.Accept, m.Reject, m.Discard,
                                    m.TemporaryFailure, m.ReplyCode)):
                return out

    def open(self, ip: str = "127.0.0.1", helo: str = "client.test",
             protocol: m.ProtocolFlags = ALL_PROTOCOL, **macros: str):
        """Negotiate (offering ``protocol``), connect from ``ip``, HELO; returns the
        negotiation answer."""
        offer = self.ask(m.Negotiate(6, ALL_ACTIONS, protocol))
        flags = {m.ProtocolFlags.NR_HEADER: m.Header, m.ProtocolFlags.NR_BODY: m.Body,
                 m.ProtocolFlags.NR_END_OF_HEADERS: m.EndOfHeaders}
        self.no_reply = tuple(t for f, t in flags.items() if f & offer.protocol_flags)
        family = b"6" if ":" in ip else b"4"
        assert isinstance(self.ask(connect_packet(family, ip)), m.Continue)
        assert isinstance(self.ask(m.Helo(helo)), m.Continue)
        if macros:
            self.send(macro_packet(b"M", **macros))
        return offer

    def message(self, mail_from: str, rcpts: list[str], raw_message: bytes,
                chunk: int = 65535) -> list[m.Message]:
        """MAIL, RCPTs, headers, body, end of message; the answers to the end of message (or
        the first refusal before it)."""
        answer = self.ask(m.EnvelopeFrom(f"<{mail_from}>".encode()))
        if not isinstance(answer, m.Continue):
            return [answer]
        for r in rcpts:
            answer = self.ask(m.EnvelopeRecipient(f"<{r}>".encode()))
            if not isinstance(answer, m.Continue):
                return [answer]
        head, _, body = raw_message.partition(b"\r\n\r\n")
        for field in head.split(b"\r\n"):
            name, _, value = field.partition(b":")
            answer = self.ask(m.Header(name.decode(), value))
            if not isinstance(answer, m.Continue):
                return [answer]
        answer = self.ask(m.EndOfHeaders())
        for i in range(0, len(body), chunk):
            answer = self.ask(m.Body(body[i:i + chunk]))
            if not isinstance(answer, m.Continue):
                return [answer]
        return self.until_answer(m.EndOfMessage(b""))
