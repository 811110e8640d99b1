"""Policy IV.C.1 (privacy standards): every message has a class, and a sender sends only the
classes it is registered for.

A header (``X-Message-Class`` by default) declares ``transactional``, ``educational`` or
``promotional``; a message without it is promotional. The class decides what later controls
require: only transactional mail may go without an unsubscribe link (IV.C.1.a, the
``unsubscribe`` check), and students with FERPA privacy flags receive educational mail only
(IV.C.1.b). Each sender's registration lists the classes it may send (``classes``, default
promotional only); any other class is refused with 550 5.7.1.

The class is put on the Context (``ctx.message_class``) for later checks, the decision log line
and the ``gateway_message_classes`` metric. An unknown or contradictory declaration counts as
promotional, the class with the most obligations. In monitor mode a class the sender may not
use is still recorded as declared (the would-be rejection is logged and counted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject
from gateway.infra.config import CheckSettings
from gateway.policy.senders import MESSAGE_CLASSES, Sender
from gateway.infra.typed import ConfigError

DEFAULT_CLASS = "promotional"
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 field-name: printable ASCII except ':'
_SHOWN = 40  # characters of a bad header value quoted back in a reply


@dataclass(frozen=True)
class MessageClassSettings(CheckSettings):
    # The header that declares the class; its value is one of transactional, educational,
    # promotional (case-insensitive). A message without it is promotional.
    header: str = "X-Message-Class"

    def validate(self, file, prefix):
        if not _FIELD_NAME.match(self.header):
            raise ConfigError(file, f"{prefix}.header", f"{self.header!r} is not a header name")


@dataclass(frozen=True)
class Declared:
    """What a message declares: its class, and a problem with the declaration if any."""

    message_class: str
    header_present: bool
    problem: Verdict | None = None


def _printable(value: str) -> str:
    text = "".join(c if " " <= c <= "~" else "?" for c in value.strip())
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def declared_class(message, header: str) -> Declared:
    """Read the class from ``header`` of the parsed ``message`` (compat32)."""
    values = message.get_all(header) if message is not None else None
    if not values:
        return Declared(DEFAULT_CLASS, False)
    names = {str(v).strip().lower() for v in values}
    if len(names) > 1:
        return Declared(DEFAULT_CLASS, True, reject(
            550, "5.7.1", f"{header} appears {len(values)} times with different values; declare "
            f"one message class ({', '.join(MESSAGE_CLASSES)})", "class_ambiguous"))
    name = names.pop()
    if name not in MESSAGE_CLASSES:
        return Declared(DEFAULT_CLASS, True, reject(
            550, "5.7.1", f"{header}: \"{_printable(str(values[0]))}\" is not a message class; "
            f"use one of {', '.join(MESSAGE_CLASSES)}", "class_invalid"))
    return Declared(name, True)


class MessageClass(Check):
    name = "message_class"
    stage = Stage.DATA
    description = "the message-class header names a class the sender is registered to send"
    Settings = MessageClassSettings

    def declared(self, ctx: Context) -> Declared:
        return declared_class(ctx.message, self.settings(ctx).header)

    async def check(self, ctx: Context) -> Verdict:
        settings = self.settings(ctx)
        found = declared_class(ctx.message, settings.header)
        ctx.message_class = found.message_class
        if found.problem is not None:
            return found.problem
        permitted = ctx.sender.classes if ctx.sender is not None else Sender.classes
        if found.message_class in permitted:
            return ACCEPT
        how = (f"declared by {settings.header}" if found.header_present
               else f"no {settings.header} header")
        who = f"sender {ctx.sender.id}" if ctx.sender is not None else "an unidentified sender"
        return reject(550, "5.7.1", f"Message class {found.message_class} ({how}) is not "
                      f"permitted for {who} (registered classes: {', '.join(permitted)})",
                      "class_not_permitted")


def message_class_of(ctx: Context, deps) -> str:
    """The class of the message, for checks that depend on it: the one the message_class check
    set, else (that check is off) read from the header with the message_class settings."""
    if ctx.message_class is None:
        ctx.message_class = MessageClass(deps).declared(ctx).message_class
    return ctx.message_class
