"""Policy IV.C.1.b: "FERPA privacy flags are respected above all - students with these flags
only receive messages related to educational business". IV.C.4.a: Do Not Email and Do Not
Contact flags are respected; IV.C.4.b and IV.C.5.b: preferences (opt-outs) are honoured.

Each flag (gateway.policy.flags) allows its carriers some message classes (``ctx.message_class``, set by
the message_class check), configured in ``[checks.recipient_flags]``: by default ``ferpa``,
``do_not_email``, ``do_not_contact`` and ``opt_out`` all allow ``educational`` and
``transactional`` mail only. A recipient carrying several flags gets only the classes all of them
allow. Opt-outs count when they are global, for the message's sender, or for its organization.

A flagged recipient is handled without telling the vendor why; no reply and no log line names a
flag (the log names the rule by an opaque id, gateway.policy.flags.FlagKeys.rule_id):

* ``on_flagged = "drop"`` (default): the recipient is accepted at RCPT like any other, and left
  out of the relay at DATA (the message still goes to the others; a message whose every recipient
  is left out is answered 250 and not relayed; ``[flags] uniform_replies`` makes relayed
  messages' replies look the same). Flags are looked up once per message, at DATA, for all
  recipients in one round trip to the state store.
* ``on_flagged = "reject"``: the class is only known at DATA, so a recipient is refused at RCPT
  (``550 5.7.1 recipient does not accept this message``, never forwarded upstream) when its flags
  forbid *every* class the sender is registered for; otherwise it is accepted and, at DATA,
  dropped like above if the message's class turns out to be forbidden.

Dropping a recipient campus mail already accepted at RCPT restarts the upstream transaction
without it (gateway.relay: RSET, MAIL, RCPT the others) before the data goes out.

Monitor mode drops nothing and refuses nothing; the decision line lists what would have happened
(reason ``recipients_dropped`` or ``recipient_refused:RULE``). When the state store cannot be
read, ``[state] on_error`` decides: ``defer`` (the default, and what "respected above all" calls
for) answers 451 4.3.0, so no flag is ever skipped; ``local`` relays without the flags (logged
and counted in ``gateway_flags_unchecked``), as it relays without shared rate limits.

The DATA half runs before the rate limit, so a message whose every recipient is dropped (and so
is not relayed) spends no sending budget.

With ``[flags] unsubscribe_base_url`` set, this check also rewrites the one-click unsubscribe
link of single-recipient mail (gateway.policy.optout_links), whenever its mode is not ``off``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import structlog

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, defer
from gateway.checks.message_class import message_class_of
from gateway.infra.config import CheckSettings
from gateway.policy.flags import RULES, FlagStore, open_flags, rule_of, sets_for
from gateway.policy.optout_links import LinkSealer, is_list_unsubscribe, rewritten
from gateway.policy.senders import MESSAGE_CLASSES, MessageClass, Sender
from gateway.message.replies import Reply
from gateway.state import StoreError
from gateway.infra.typed import ConfigError

log = structlog.get_logger("gateway.policy.flags")
REFUSED = Reply(550, "5.7.1", "recipient does not accept this message")
UNAVAILABLE = defer(451, "4.3.0", "Temporary local problem; try again later",
                    "recipient_state_unavailable")
_NOT_PROMOTIONAL: tuple[MessageClass, ...] = ("educational", "transactional")


@dataclass(frozen=True)
class RecipientFlagsSettings(CheckSettings):
    # "drop": accept the recipient, leave it out of the relay; "reject": 550 5.7.1 at RCPT when
    # its flags forbid every class the sender may send (else dropped at DATA).
    on_flagged: Literal["drop", "reject"] = "drop"
    # The message classes a recipient with each flag still receives.
    ferpa: tuple[MessageClass, ...] = _NOT_PROMOTIONAL
    do_not_email: tuple[MessageClass, ...] = _NOT_PROMOTIONAL
    do_not_contact: tuple[MessageClass, ...] = _NOT_PROMOTIONAL
    opt_out: tuple[MessageClass, ...] = _NOT_PROMOTIONAL

    def validate(self, file, prefix):
        for rule in RULES:
            classes = getattr(self, rule)
            if len(set(classes)) != len(classes):
                raise ConfigError(file, f"{prefix}.{rule}", "lists a message class more than once")
        if "promotional" in self.ferpa:
            raise ConfigError(file, f"{prefix}.ferpa", "students with FERPA privacy flags only "
                              "receive educational business (policy IV.C.1.b): promotional "
                              "cannot be allowed")

    def allowed(self, names: frozenset[str]) -> set[str]:
        """The classes a recipient in the sets ``names`` may receive."""
        allowed = set(MESSAGE_CLASSES)
        for name in names:
            allowed &= set(getattr(self, rule_of(name)))
        return allowed

    def forbidding(self, names: frozenset[str], message_class: str) -> str | None:
        """The first rule (in RULES order) that keeps ``message_class`` from the recipient."""
        rules = {rule_of(n) for n in names}
        return next((r for r in RULES if r in rules and message_class not in getattr(self, r)),
                    None)


class _RecipientFlags(Check):
    name = "recipient_flags"
    description = ("FERPA, Do Not Email / Do Not Contact and opt-outs: flagged recipients only "
                   "get the message classes their flags allow")
    Settings = RecipientFlagsSettings

    def __init__(self, deps) -> None:
        super().__init__(deps)
        self.flags: FlagStore = deps.flags or open_flags(deps.config, deps.state)
        self.rule_ids = {rule: self.flags.keys.rule_id(rule) for rule in RULES}
        self.on_error = deps.config.state.on_error

    def unavailable(self, exc: StoreError) -> Verdict:
        if self.on_error != "local":
            return UNAVAILABLE
        log.warning("state_unavailable_unchecked", error=str(exc))
        if self.deps.metrics is not None:
            self.deps.metrics.flags_unchecked.inc()
        return ACCEPT

    async def lookup(self, ctx: Context, recipients: list[str]) -> None:
        """Flags of the recipients not looked up yet, into ``ctx.recipient_flags``; one round
        trip. Raises StoreError."""
        missing = [r for r in dict.fromkeys(recipients) if r not in ctx.recipient_flags]
        if not missing:
            return
        # recipients are str(Mailbox) from the SMTP front's strict parse: not parsed again
        found = await self.flags.lookup(missing, sets_for(ctx.sender), parsed=True)
        for r in missing:
            ctx.recipient_flags[r] = found.get(r, frozenset())


class RecipientFlagsAtRcpt(_RecipientFlags):
    """The RCPT half: in reject mode, refuse a recipient no class of this sender may reach."""

    stage = Stage.RCPT
    uses_message = False

    def active(self, ctx: Context) -> bool:
        return ctx.rcpt is not None and self.settings(ctx).on_flagged == "reject"

    async def check(self, ctx: Context) -> Verdict:
        settings = self.settings(ctx)
        if not self.active(ctx):
            return ACCEPT
        try:
            await self.lookup(ctx, [ctx.rcpt])
        except StoreError as exc:
            return self.unavailable(exc)
        names = ctx.recipient_flags[ctx.rcpt]
        if not names:
            return ACCEPT
        classes = ctx.sender.classes if ctx.sender is not None else Sender.classes
        if settings.allowed(names) & set(classes):
            return ACCEPT  # some class may reach it: decided at DATA
        rule = next(r for c in classes if (r := settings.forbidding(names, c)))
        return Verdict("reject", REFUSED, f"recipient_refused:{self.rule_ids[rule]}")


class RecipientFlags(_RecipientFlags):
    """The DATA half: drop the recipients the message's class may not reach."""

    stage = Stage.DATA

    def __init__(self, deps) -> None:
        super().__init__(deps)
        cfg = deps.config.flags
        self.base_url = cfg.unsubscribe_base_url.rstrip("/")
        self.links = LinkSealer(self.flags.keys, cfg.unsubscribe_days) if self.base_url else None

    async def check(self, ctx: Context) -> Verdict:
        settings = self.settings(ctx)
        message_class = message_class_of(ctx, self.deps)
        try:
            await self.lookup(ctx, ctx.recipients)
        except StoreError as exc:
            return self.unavailable(exc)
        drop = []
        for rcpt in ctx.recipients:
            names = ctx.recipient_flags.get(rcpt)
            rule = settings.forbidding(names, message_class) if names else None
            if rule is not None:
                drop.append((rcpt, self.rule_ids[rule]))
        headers = self._rewrite(ctx, [] if settings.mode == "monitor" else [r for r, _ in drop])
        if drop:
            return Verdict("accept", reason="recipients_dropped", headers=headers,
                           drop=tuple(drop))
        return Verdict("accept", headers=headers) if headers else ACCEPT

    def _rewrite(self, ctx: Context, dropped: list[str]) -> tuple[tuple[str, str], ...]:
        """The one-click link through the gateway, for mail left with one recipient."""
        if self.links is None or ctx.sender is None:
            return ()
        kept = [r for r in ctx.recipients if r not in dropped]
        now = self.deps.clock.now()
        sender = ctx.sender.id
        fields = rewritten(ctx.message, lambda uri: f"{self.base_url}/u/"
                           f"{self.links.issue(kept[0], sender, uri, now)}", kept)
        if fields is None:
            return ()
        ctx.strip_headers.append(is_list_unsubscribe)
        return fields
