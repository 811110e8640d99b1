"""The one interface every policy control implements.

A check looks at a :class:`Context` (session facts, the identified sender, the envelope, the
parsed message) and returns a :class:`Verdict`. Each check runs at one SMTP stage and has a mode,
``enforce``, ``monitor`` (log and count what it would have done, then accept) or ``off``, set in
``[checks.NAME]`` of gateway.toml and overridable in a sender's own file.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, ClassVar, Literal

from gateway.infra.config import CheckSettings
from gateway.message.headers import Field, split
from gateway.message.replies import Reply
from gateway.state.rooms import Rooms

if TYPE_CHECKING:
    from gateway.policy.adaptive import AdaptiveRate
    from gateway.checks.auth_dkim import DkimResult
    from gateway.ops.metrics import Metrics
    from gateway.policy.throttles import Throttles
    from gateway.infra.dns import Resolver
    from gateway.policy.quarantine import Quarantine
    from gateway.infra.clock import Clock
    from gateway.infra.config import Config
    from gateway.policy.senders import Registry, Sender
    from gateway.state import Store
    from gateway.policy.flags import FlagStore


class Stage(enum.Enum):
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True)
class Verdict:
    # "quarantine": store the message in the quarantine (not relayed) and reply 250 with its id
    action: Literal["accept", "reject", "defer", "quarantine"]
    reply: Reply | None = None
    reason: str = ""  # short, stable, for logs and metric labels
    headers: tuple[tuple[str, str], ...] = ()
    # An accepted verdict may leave recipients out of the relay: (recipient, rule) pairs, the
    # rule an opaque label for the log. handle_DATA relays to the others (restarting the
    # upstream transaction without them); none left: 250, nothing relayed (gateway.policy.flags).
    drop: tuple[tuple[str, str], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.action == "accept"


ACCEPT = Verdict("accept")


def reject(code: int, enhanced: str, text: str, reason: str) -> Verdict:
    return Verdict("reject", Reply(code, enhanced, text), reason)


def defer(code: int, enhanced: str, text: str, reason: str) -> Verdict:
    return Verdict("defer", Reply(code, enhanced, text), reason)


@dataclass
class Context:
    """What a check may look at: the facts of one SMTP transaction, gathered so far."""

    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    helo: str = ""
    tls: bool = False
    auth_user: str | None = None
    mail_from: str = ""
    recipients: list[str] = field(default_factory=list)
    sender: Sender | None = None
    candidates: tuple[Sender, ...] = ()
    message: Message | None = None  # the whole MIME tree, parsed once (compat32) at DATA
    raw: bytes = b""  # the message as received, before the gateway's own headers
    # its header fields, byte for byte, from the one canonical split (gateway.message.headers):
    # what campus mail receives; ctx.message was parsed from the same, admitted, bytes
    header_fields: tuple[Field, ...] = ()
    size: int = 0
    # transactional | educational | promotional, from the message-class header (set at DATA by
    # the message_class check); what later controls (unsubscribe, suppression, FERPA) key on
    message_class: str | None = None
    # Header fields DATA checks want removed from the relayed message: predicates on
    # (name, unfolded value), applied by handle_DATA (e.g. forged Authentication-Results).
    strip_headers: list[Callable[[str, str], bool]] = field(default_factory=list)
    # At RCPT: the recipient being decided (normalized), before it is forwarded upstream.
    rcpt: str | None = None
    # Recipient flags looked up so far, by recipient (checks.recipient_flags); never logged.
    recipient_flags: dict[str, frozenset[str]] = field(default_factory=dict)
    # A dry run (``gateway explain``, through Engine.explain): decide as for real, but spend no
    # budget, count no audience and write no state. The engine itself logs, counts and stores
    # nothing then; a check that spends or writes must only look when this is set.
    dry_run: bool = False
    # Every DKIM-Signature of ``raw`` verified, once per message (checks.dkim_once): shared by
    # sender_auth and unsubscribe so that no signature is verified twice. None: not yet.
    dkim: list[DkimResult] | None = None
    # The h= tags of the message's DKIM-Signature fields (checks.unsubscribe), read once per
    # message for both halves of that check: (the message they were read from, one set each).
    dkim_signed: tuple[Message, list[frozenset[str]]] | None = None


@dataclass(frozen=True)
class Deps:
    """What checks are built with, once, at start-up."""

    config: Config
    registry: Registry
    clock: Clock
    state: Store
    metrics: Metrics | None = None
    adaptive: AdaptiveRate | None = None  # the gateway-wide rate, when [limits] adaptive
    throttles: Throttles | None = None  # run-time throttles, shared with the admin API
    dns: Resolver | None = None  # the shared asynchronous resolver and cache (gateway.infra.dns)
    quarantine: Quarantine | None = None  # where "quarantine" verdicts store messages
    # the mail log's recipient-hashing key ([logging] hash_key_file): checks that keep recipients
    # in the state store keep them as keyed hashes with it (gateway.policy.audience.recipient_hash)
    recipient_key: bytes | None = None
    flags: FlagStore | None = None  # recipient flags (gateway.policy.flags), keyed with [flags] key_file
    # what the rate windows' room was when last learned, shared by the two halves of the rate
    # check (gateway.state.rooms); a reload's checks take over the one before (Check.inherit)
    rooms: Rooms = field(default_factory=Rooms)


class Check:
    """A policy control. Subclasses set ``name``, ``stage``, ``description`` and, when they take
    options beyond ``mode``, a ``Settings`` dataclass deriving from CheckSettings (its fields and
    defaults are the check's schema for ``[checks.NAME]`` in gateway.toml and sender files)."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    description: ClassVar[str] = ""
    Settings: ClassVar[type[CheckSettings]] = CheckSettings
    # reads ctx.message (the parsed MIME tree); a DATA check that only needs the envelope or the
    # raw bytes says False, so that the message is not parsed for it
    uses_message: ClassVar[bool] = True

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def inherit(self, previous: Check) -> None:
        """At a reload (gateway.ops.reload), take over the run-time state (caches, per-process
        counts) of ``previous``, the same check built from the configuration before."""

    def active(self, ctx: Context) -> bool:
        """False when the check has nothing to do for this transaction whatever its mode (e.g.
        a RCPT-stage half that only one setting uses): skipped like ``off``, untimed."""
        return True

    def settings(self, ctx: Context) -> CheckSettings:
        """This check's settings for the transaction: the sender's own, else the global ones."""
        if ctx.sender is not None and self.name in ctx.sender.checks:
            return ctx.sender.checks[self.name]
        return self.deps.config.check_settings(self.name)

    async def check(self, ctx: Context) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError


def header_fields(raw: bytes) -> list[tuple[str, str, list[bytes]]]:
    """The header block of ``raw`` as (name, unfolded value, its lines) per field, in order:
    the one canonical split (gateway.message.headers), so ``raw`` must be a message the DATA
    path admitted (HeaderError otherwise: nothing is ever guessed)."""
    return [(f.name, f.unfolded(), (f.name.encode("ascii") + b":" + f.value).split(b"\r\n"))
            for f in split(raw).fields]


def strip_header_fields(raw: bytes, predicates: list[Callable[[str, str], bool]]) -> bytes:
    """``raw`` without the header fields (with their continuation lines) that any predicate
    matches, given (name, unfolded value); everything else is kept byte for byte. Fields are
    those of the one canonical split (gateway.message.headers), as in :func:`header_fields`."""
    if not predicates:
        return raw
    block = split(raw)
    kept = [f for f in block.fields if not any(p(f.name, f.unfolded()) for p in predicates)]
    return raw if len(kept) == len(block.fields) else block.assemble(kept)
