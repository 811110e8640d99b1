"""A local Maildir standing in for campus mail: each message is written to ``tmp/``, synced,
then renamed into ``new/``, so a reader never sees half a message and an accepted message
survives a crash. The write runs off the event loop."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from pathlib import Path

from gateway.infra.files import fsync_dir, write_atomic
from gateway.message.replies import Reply


class MaildirUpstream:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"maildir:{self.path}"
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    async def begin(self, mail_from: str, eightbit: bool, size: int | None,
                    owner: str | None = None) -> MaildirTransaction:
        return MaildirTransaction(self, mail_from)

    def deliver(self, mail_from: str, recipients: list[str], content: bytes) -> str:
        name = f"{time.time_ns()}.P{os.getpid()}R{secrets.token_hex(8)}.{self._host}"
        head = [f"Return-Path: <{mail_from}>"] + [f"Delivered-To: {r}" for r in recipients]
        body = ("\n".join(head) + "\n").encode() + content.replace(b"\r\n", b"\n")
        write_atomic(self.path / "tmp" / name, self.path / "new" / name, body)
        fsync_dir(self.path / "new")
        return name

    async def close(self) -> None:
        return None


class MaildirTransaction:
    def __init__(self, upstream: MaildirUpstream, mail_from: str) -> None:
        self.upstream, self.mail_from = upstream, mail_from
        self.recipients: list[str] = []

    async def rcpt(self, address: str) -> Reply:
        self.recipients.append(address)
        return Reply(250, "2.1.5", "OK")

    async def restart(self, recipients: list[str]) -> Reply:
        self.recipients = list(recipients)
        return Reply(250, "2.1.5", "OK")

    async def data(self, content: bytes, checked: int = 0) -> Reply:
        try:
            name = await asyncio.to_thread(self.upstream.deliver, self.mail_from,
                                           self.recipients, content)
        except OSError as exc:
            return Reply(451, "4.3.0", f"Local maildir write failed ({exc.strerror}); "
                                       "try again later")
        return Reply(250, "2.0.0", f"Ok: delivered as {name.split('.')[1]}")

    async def abort(self) -> None:
        return None
