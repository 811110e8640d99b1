"""What the engine hands a front: the transaction, a recipient's decision, the end result."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.checks.base import Context
from gateway.checks.pipeline import Outcome
from gateway.engine.edits import field_positions
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.engine.generation import Generation


@dataclass
class Client:
    """The facts of one client connection, however the front learned them (the SMTP session;
    the milter's connect, HELO and macros)."""

    session_id: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    helo: str = ""
    tls: bool = False
    auth_user: str | None = None


@dataclass
class Transaction:
    """One mail transaction: from MAIL to the answer at the end of the message. ``reply`` is set
    when MAIL was refused (the decision is already logged)."""

    session_id: str
    queue_id: str
    ctx: Context
    outcome: Outcome
    started: float
    mail_options: list[str] = field(default_factory=list)
    reply: Reply | None = None
    # explain: decide without logging, counting or storing anything (see Engine.explain)
    dry_run: bool = False
    # the configuration, registry and checks it is decided under, from MAIL to its end (reload)
    gen: Generation | None = None


@dataclass(frozen=True)
class RcptDecision:
    """The engine's answer for one recipient: ``reply`` None means policy lets ``mailbox`` (the
    normalized address) through; the front then forwards it (SMTP front) or accepts it (milter)
    and calls :meth:`Engine.rcpt_accepted` or :meth:`Engine.rcpt_refused`."""

    reply: Reply | None
    reason: str = ""
    mailbox: str | None = None


@dataclass
class Result:
    """The end-of-message decision.

    ``kind``:
      - ``"relay"``: deliver to ``txn.ctx.recipients`` (the kept ones) with ``headers`` added at
        the top (in order) and the header fields ``strip`` matches removed (``content`` is the
        message with them already removed); ``dropped`` were left out. The front delivers, then
        calls :meth:`Engine.delivered` or :meth:`Engine.finish`.
      - ``"quarantine"``: keep the message, not delivered (the same edits apply); the SMTP front
        calls :meth:`Engine.store_quarantined`, the milter front holds it in the MTA's queue
        and calls :meth:`Engine.finish`.
      - ``"reply"``: the transaction is over with ``reply`` (refused, deferred, or every
        recipient dropped); the decision is already logged.
    """

    kind: Literal["relay", "quarantine", "reply"]
    txn: Transaction
    reply: Reply | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    content: bytes = b""
    strip: list[Callable[[str, str], bool]] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # recipient -> "check:rule"
    # the message as the front handed it, before the engine left out forged fields: what a
    # front that edits in place (milter) still holds, so what removals() indexes
    received: bytes = b""

    @property
    def outcome(self) -> Outcome:
        return self.txn.outcome

    def removals(self) -> list[tuple[str, int]]:
        """The header fields to remove as (name, 1-based index among the fields of that name),
        for a front that edits headers in place (milter SMFIR_CHGHEADER)."""
        return field_positions(self.received or self.txn.ctx.raw, self.strip)
