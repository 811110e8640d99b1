"""The one interface every policy control implements.

A check looks at a :class:`Context` (session facts, the identified sender, the envelope, the
parsed message) and returns a :class:`Verdict`. Each check runs at one SMTP stage and has a mode,
``enforce``, ``monitor`` (log and count what it would have done, then accept) or ``off``, set in
``[checks.NAME]`` of gateway.toml and overridable in a sender's own file.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, ClassVar, Literal

from gateway.config import CheckSettings
from gateway.smtp.replies import Reply

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config import Config
    from gateway.senders import Registry, Sender
    from gateway.state import Store


class Stage(enum.Enum):
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True)
class Verdict:
    action: Literal["accept", "reject", "defer"]
    reply: Reply | None = None
    reason: str = ""  # short, stable, for logs and metric labels
    headers: tuple[tuple[str, str], ...] = ()

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
    size: int = 0


@dataclass(frozen=True)
class Deps:
    """What checks are built with, once, at start-up."""

    config: Config
    registry: Registry
    clock: Clock
    state: Store


class Check:
    """A policy control. Subclasses set ``name``, ``stage``, ``description`` and, when they take
    options beyond ``mode``, a ``Settings`` dataclass deriving from CheckSettings (its fields and
    defaults are the check's schema for ``[checks.NAME]`` in gateway.toml and sender files)."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    description: ClassVar[str] = ""
    Settings: ClassVar[type[CheckSettings]] = CheckSettings

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def settings(self, ctx: Context) -> CheckSettings:
        """This check's settings for the transaction: the sender's own, else the global ones."""
        if ctx.sender is not None and self.name in ctx.sender.checks:
            return ctx.sender.checks[self.name]
        return self.deps.config.check_settings(self.name)

    async def check(self, ctx: Context) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError
