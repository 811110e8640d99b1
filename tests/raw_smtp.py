"""A raw-socket SMTP client for tests: bytes go out exactly as given (smtplib would quote or
refuse them), and each reply comes back exactly as the gateway wrote it, CRLFs included."""

from __future__ import annotations

import re
import socket
import ssl

REPLY_LINE = re.compile(rb"\A(\d{3})([ -])(.*)\r\n\Z", re.S)


class RawSMTP:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def lines(self) -> list[bytes]:
        """The lines of one reply, each with its CRLF; [] when the server closed."""
        out = []
        while True:
            line = self.file.readline()
            if not line:
                return out
            out.append(line)
            m = REPLY_LINE.match(line)
            if m is None or m.group(2) == b" ":
                return out

    def reply(self) -> bytes:
        return b"".join(self.lines())

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        return self.file.read(1) == b""

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert self.cmd(b"STARTTLS").startswith(b"220")
        self.sock = ctx.wrap_socket(self.sock, server_hostname="gw.test")
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
