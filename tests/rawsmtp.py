"""A raw-socket SMTP client for tests whose bytes a client library would normalize (smtplib
and aiosmtplib rewrite bare CR and LF to CRLF), and a check that records what the checks saw."""

from __future__ import annotations

import re
import socket

from gateway.checks.base import ACCEPT, Check, Context, Stage
from gateway.infra.config import CheckSettings

# One reply line: code, enhanced code of the same class, printable ASCII text.
REPLY_LINE = re.compile(rb"([245][0-9][0-9])([ -])([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: [ -~]*)?\r\n")


class RawSMTP:
    """One connection kept open across transactions; :meth:`send` returns the raw reply."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.reply()  # greeting
        self.command(b"EHLO client.test")

    def reply(self) -> bytes:
        """One whole reply (all its lines), as received."""
        out = b""
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"connection closed after {out!r}")
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, data: bytes, mail_from: bytes = b"bounce-1@em.acme.example",
             rcpt: bytes = b"alice@example.edu") -> bytes:
        """MAIL, RCPT, DATA and ``data`` (dot-stuffed, given a final CRLF when it has none):
        the reply to the final dot, or the first refusal."""
        for line in (b"MAIL FROM:<" + mail_from + b">", b"RCPT TO:<" + rcpt + b">"):
            reply = self.command(line)
            if not reply.startswith(b"250"):
                return reply
        reply = self.command(b"DATA")
        if not reply.startswith(b"354"):
            return reply
        self.sock.sendall(stuffed(data) + b".\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.command(b"QUIT")
        except OSError:
            pass
        self.file.close()
        self.sock.close()


def on_wire(data: bytes) -> bytes:
    """What the gateway receives as the message for ``data`` sent by :meth:`RawSMTP.send`."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def stuffed(data: bytes) -> bytes:
    data = on_wire(data)
    return (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")


class Recorder(Check):
    """A DATA check, first in line, that keeps what the checks are given: the canonical header
    fields, the stdlib's parsed top-level fields (raw), and the raw message."""

    name = "test_recorder"
    stage = Stage.DATA
    uses_message = True

    def __init__(self) -> None:
        self.seen: list[tuple[tuple, list[tuple[str, str]], bytes]] = []

    def settings(self, ctx: Context) -> CheckSettings:
        return CheckSettings()

    async def check(self, ctx: Context):
        parsed = list(ctx.message.raw_items()) if ctx.message is not None else []
        self.seen.append((ctx.header_fields, parsed, ctx.raw))
        return ACCEPT


def install_recorder(running_gateway) -> Recorder:
    recorder = Recorder()
    running_gateway.gateway.pipeline.by_stage[Stage.DATA].insert(0, recorder)
    return recorder


def split_fields(message: bytes) -> tuple[list[bytes], bytes]:
    """An independent reading of a relayed message: its header fields as raw byte strings
    (each with its final CRLF) and its body. Only for CRLF-clean input."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        head, body = message[:-2], b""
    fields = re.split(rb"\r\n(?![ \t])", head) if head else []
    return [f + b"\r\n" for f in fields], body
