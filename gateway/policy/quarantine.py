"""The quarantine (policy IV.B.3.c.iii: failing mail "may be quarantined"): a Maildir of messages
that were accepted from the client (250) but not relayed.

Layout under ``[quarantine] dir``: ``tmp/``, ``new/``, ``cur/`` (a Maildir a mail reader can open;
each message is exactly the bytes that would have been relayed, Received: and
Authentication-Results: included, named by its queue id) and ``meta/ID.json``, the envelope and
the decision (MAIL FROM, recipients, sender, client, reason). Writes go to ``tmp/`` then are
renamed, after fsync, so a reader never sees half a message. Administrators list, show, release
(relay to campus mail with the original envelope) or delete with ``gateway quarantine``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.infra.files import fsync_dir, write_atomic
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.relay.base import Upstream

_ID = re.compile(r"[0-9A-Za-z]{1,64}\Z")


class QuarantineError(Exception):
    """No such item, or a bad id."""


@dataclass
class Item:
    id: str
    stored_at: str  # ISO 8601, UTC, from the gateway's clock
    mail_from: str
    recipients: list[str]
    sender: str | None
    client_ip: str
    helo: str
    reason: str  # the deciding check's reason label
    detail: str  # what the check found, as the client would have been told on reject
    decided_by: str | None = None
    message_id: str = ""
    subject: str = ""
    size: int = 0
    mail_options: list[str] = field(default_factory=list)

    @property
    def eightbit(self) -> bool:
        return any(o.upper() == "BODY=8BITMIME" for o in self.mail_options)


class Quarantine:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        for sub in ("tmp", "new", "cur", "meta"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    # --- storing (the gateway, off the event loop) ---------------------------------------

    def _store(self, item: Item, content: bytes) -> None:
        if not _ID.match(item.id):
            raise QuarantineError(f"bad quarantine id {item.id!r}")
        meta = json.dumps(asdict(item), indent=1).encode()
        write_atomic(self.path / "tmp" / f"{item.id}.json", self.path / "meta" / f"{item.id}.json",
                      meta)
        write_atomic(self.path / "tmp" / item.id, self.path / "new" / item.id, content)
        fsync_dir(self.path / "meta")
        fsync_dir(self.path / "new")

    async def store(self, item: Item, content: bytes) -> None:
        await asyncio.to_thread(self._store, item, content)

    # --- administration (the CLI) --------------------------------------------------------

    def _message_path(self, item_id: str) -> Path:
        if not _ID.match(item_id):
            raise QuarantineError(f"bad quarantine id {item_id!r}")
        for candidate in [self.path / "new" / item_id, self.path / "cur" / item_id,
                          *sorted((self.path / "cur").glob(f"{item_id}:*"))]:
            if candidate.exists():
                return candidate
        raise QuarantineError(f"no quarantined message {item_id}")

    def _resolve_id(self, item_id: str) -> str:
        """Ids are upper-case hex; accept any case."""
        if (self.path / "meta" / f"{item_id}.json").exists():
            return item_id
        upper = item_id.upper()
        if _ID.match(upper) and (self.path / "meta" / f"{upper}.json").exists():
            return upper
        raise QuarantineError(f"no quarantined message {item_id}")

    def get(self, item_id: str) -> tuple[Item, bytes]:
        if not _ID.match(item_id):
            raise QuarantineError(f"bad quarantine id {item_id!r}")
        item_id = self._resolve_id(item_id)
        data = json.loads((self.path / "meta" / f"{item_id}.json").read_text())
        return Item(**data), self._message_path(item_id).read_bytes()

    def list(self) -> list[Item]:
        items = []
        for meta in sorted((self.path / "meta").glob("*.json")):
            try:
                items.append(Item(**json.loads(meta.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(items, key=lambda i: (i.stored_at, i.id))

    def count(self) -> int:
        """Messages in the quarantine (gateway_quarantine_messages)."""
        try:
            return sum(1 for _ in os.scandir(self.path / "meta"))
        except FileNotFoundError:
            return 0

    def delete(self, item_id: str) -> None:
        item, _ = self.get(item_id)
        self._message_path(item.id).unlink()
        (self.path / "meta" / f"{item.id}.json").unlink()

    def _update(self, item: Item) -> None:
        meta = json.dumps(asdict(item), indent=1).encode()
        write_atomic(self.path / "tmp" / f"{item.id}.json.new",
                      self.path / "meta" / f"{item.id}.json", meta)

    async def release(self, item_id: str, upstream: Upstream) -> tuple[Reply, list[tuple[str, Reply]]]:
        """Relay a quarantined message with its original envelope; returns the upstream's reply
        to the data and the refused recipients. After a 2xx the item is deleted, or, when some
        recipients were refused, kept with only those (release it again later)."""
        from gateway.relay.base import UpstreamError

        item, content = self.get(item_id)
        try:
            txn = await upstream.begin(item.mail_from, item.eightbit, len(content))
        except UpstreamError as exc:
            return exc.reply, []
        refused = []
        for rcpt in item.recipients:
            reply = await txn.rcpt(rcpt)
            if not reply.ok:
                refused.append((rcpt, reply))
        if len(refused) == len(item.recipients):
            await txn.abort()
            return Reply(554, "5.5.1", "No recipient was accepted"), refused
        reply = await txn.data(content)
        if reply.ok:
            if refused:
                item.recipients = [r for r, _ in refused]
                self._update(item)
            else:
                self.delete(item.id)
        return reply, refused


def item_for(queue_id: str, ctx, verdict, decided_by: str | None, mail_options: list[str],
             stored_at: str) -> Item:
    """The quarantine record of a transaction the pipeline decided to quarantine."""
    message = ctx.message
    header = (lambda name: str(message.get(name, "")).strip()[:200]) if message is not None \
        else (lambda name: "")
    return Item(id=queue_id, stored_at=stored_at, mail_from=ctx.mail_from,
                recipients=list(ctx.recipients), sender=ctx.sender.id if ctx.sender else None,
                client_ip=str(ctx.client_ip), helo=ctx.helo, reason=verdict.reason,
                detail=verdict.reply.text if verdict.reply is not None else "",
                decided_by=decided_by, message_id=header("Message-ID"),
                subject=header("Subject"), size=ctx.size, mail_options=list(mail_options))
