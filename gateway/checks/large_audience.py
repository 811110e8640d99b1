"""Policy IV.B.3.c.iv: "Messages to audiences containing over 15,000 university email addresses
may not be sent during business hours."

At DATA, the message's campaign and audience are worked out (gateway.policy.audience): the largest of
the declared size, and the distinct university recipients plus distribution-list members the
campaign reached within ``[business_hours] window``. During business hours (gateway.policy.business_hours)
a message of a campaign over ``[business_hours] large_audience`` is deferred with ``451 4.7.1``
naming the hours and when to retry, so the vendor's MTA completes the send after hours
(``action = "reject"``: ``550 5.7.1``). Outside business hours it passes.

The message's recipients are counted **before** deciding, whatever the decision: they are part
of the audience whether this message goes now or after hours, so the message that takes a
campaign over the threshold is itself deferred ("from that message on"). Counting is of distinct
keyed hashes, so the vendor's retries of a deferred message add nothing. The first message over
the threshold logs ``large_audience_crossed`` and counts in ``gateway_large_audience_campaigns``.

Runs before ``rate_limit``, so a deferred message spends no sending budget. When the state store
cannot be reached, ``[state] on_error = "local"`` counts in this process only; with ``defer`` the
check decides on what the message alone shows (its declared size, its own recipients and lists)
and otherwise lets it on to the later checks on the same store (recipient_flags, rate_limit),
which answer the message ``451 4.3.0`` themselves: one reply for one outage.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass
from typing import Literal

import structlog

from gateway.policy.audience import (Audience, Campaign, LargestCampaigns, crossed, declared_size,
                              identify, measure, peek, recipient_hash)
from gateway.policy.business_hours import BusinessHours
from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, defer, reject
from gateway.infra.config import CheckSettings
from gateway.state import Store, StoreError
from gateway.state.memory import MemoryStore
from gateway.infra.typed import ConfigError

log = structlog.get_logger("gateway.policy.audience")
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 field-name: printable ASCII except ':'
_HASH_INLINE_MAX = 256  # more recipients than this are hashed in a worker thread


@dataclass(frozen=True)
class LargeAudienceSettings(CheckSettings):
    # During business hours, a message of a large-audience campaign is deferred (451 4.7.1, the
    # vendor retries after hours) or rejected (550 5.7.1).
    action: Literal["defer", "reject"] = "defer"
    # The headers naming a message's campaign, first present wins. Feedback-ID: its identifiers
    # before the SenderId; List-Id: the <list-id>. None present: sender + From + Subject.
    campaign_headers: tuple[str, ...] = ("Feedback-ID", "X-Campaign-ID", "List-Id")
    # The header in which a campaign may declare its audience size.
    size_header: str = "X-Audience-Size"

    def validate(self, file, prefix):
        for i, name in enumerate(self.campaign_headers):
            if not _FIELD_NAME.match(name):
                raise ConfigError(file, f"{prefix}.campaign_headers[{i}]",
                                  f"{name!r} is not a header name")
        if not _FIELD_NAME.match(self.size_header):
            raise ConfigError(file, f"{prefix}.size_header",
                              f"{self.size_header!r} is not a header name")


class LargeAudience(Check):
    name = "large_audience"
    stage = Stage.DATA
    description = "no sends to audiences over 15,000 university addresses in business hours"
    Settings = LargeAudienceSettings

    def __init__(self, deps) -> None:
        super().__init__(deps)
        cfg = deps.config.business_hours
        self.hours = BusinessHours.from_config(cfg)
        self.threshold = cfg.large_audience
        self.window = cfg.window_seconds
        self.lists = {lst.address.lower(): lst.members for lst in deps.config.university.lists}
        self.on_error = deps.config.state.on_error
        self.local = MemoryStore(deps.clock)  # per-process fallback for on_error = "local"
        self.metrics = deps.metrics
        self.key = deps.recipient_key
        if self.key is None:  # (wired by gateway.app; a bare Deps counts with a process key)
            self.key = secrets.token_bytes(32)
        self.largest = LargestCampaigns(deps.clock, self.window)
        self._gauged: set[str] = set()

    def _hash_all(self, addresses: list[str]) -> list[str]:
        return [recipient_hash(self.key, a) for a in addresses]

    async def _split(self, recipients: list[str]) -> tuple[list[str], dict[str, int]]:
        """(keyed hashes of individual recipients, {list hash: members} of list addresses)."""
        individuals = [r for r in recipients if r.lower() not in self.lists]
        lists = {recipient_hash(self.key, r): self.lists[r.lower()]
                 for r in recipients if r.lower() in self.lists}
        if len(individuals) > _HASH_INLINE_MAX:
            return await asyncio.to_thread(self._hash_all, individuals), lists
        return self._hash_all(individuals), lists

    async def _measure(self, campaign: Campaign, individuals: list[str],
                       lists: dict[str, int]) -> tuple[tuple[int, int] | None, Store]:
        """((individuals, list members) reached, the store that counted them); None reached
        when the store is down and on_error is "defer"."""
        try:
            return await measure(self.deps.state, campaign, individuals, lists, self.window,
                                 self.threshold), self.deps.state
        except StoreError as exc:
            if self.on_error != "local":
                log.error("state_unavailable", check=self.name, error=str(exc))
                return None, self.deps.state
            log.warning("state_unavailable_local_counts", check=self.name, error=str(exc))
            return await measure(self.local, campaign, individuals, lists, self.window,
                                 self.threshold), self.local

    async def _peek(self, campaign: Campaign, individuals: list[str],
                    lists: dict[str, int]) -> tuple[int, int] | None:
        """What :meth:`_measure` would find, without recording: the audience so far plus this
        message's recipients (an upper bound: some may be counted already) and its lists not
        yet counted."""
        try:
            return await peek(self.deps.state, campaign, individuals, lists, self.window)
        except StoreError:
            return None

    async def check(self, ctx: Context) -> Verdict:
        settings = self.settings(ctx)
        sender_id = ctx.sender.id if ctx.sender is not None else f"ip:{ctx.client_ip}"
        campaign = identify(ctx.message, sender_id, settings.campaign_headers, self.key)
        declared = declared_size(ctx.message, settings.size_header)
        individuals, lists = await self._split(ctx.recipients)
        if ctx.dry_run:  # gateway explain: counted as if added, nothing written
            reached, store = await self._peek(campaign, individuals, lists), self.deps.state
        else:
            reached, store = await self._measure(campaign, individuals, lists)
        known = reached is not None and not ctx.dry_run
        if reached is None:  # what this message alone shows
            reached = (len(set(individuals)), sum(lists.values()))
        audience = Audience(declared, *reached)
        over = audience.size > self.threshold
        if over and known:
            await self._crossing(store, ctx, sender_id, campaign, audience)
        if known:
            self._gauge(sender_id, campaign, audience.size)
        now = self.deps.clock.now()
        if not self.hours.is_open(now):
            return ACCEPT
        if over:
            return self._refuse(settings, sender_id, campaign, audience, now)
        return ACCEPT  # (store down: the later checks on the same store defer with 451 4.3.0)

    async def _crossing(self, store: Store, ctx: Context, sender_id: str, campaign: Campaign,
                        audience: Audience) -> None:
        try:
            first = await crossed(store, campaign, self.window)
        except StoreError as exc:  # the decision does not depend on it
            log.warning("state_unavailable", check=self.name, error=str(exc))
            return
        if not first:
            return
        if self.metrics is not None:
            self.metrics.large_audience_campaigns.labels(sender_id, audience.basis).inc()
        message_id = str(ctx.message.get("Message-ID", "")) if ctx.message is not None else ""
        log.info("large_audience_crossed", sender=sender_id, campaign=campaign.label,
                 campaign_source=campaign.source, audience=audience.size, basis=audience.basis,
                 declared=audience.declared, individuals=audience.individuals,
                 list_members=audience.list_members, threshold=self.threshold,
                 business_hours=self.hours.is_open(self.deps.clock.now()),
                 message_id=message_id.strip()[:200])

    def inherit(self, previous: LargeAudience) -> None:
        self.local = previous.local
        if previous.window == self.window:
            self.largest, self._gauged = previous.largest, previous._gauged

    def _gauge(self, sender_id: str, campaign: Campaign, size: int) -> None:
        self.largest.observe(sender_id, campaign.key, size, campaign.label)
        if self.metrics is not None and sender_id not in self._gauged:
            self._gauged.add(sender_id)  # read at scrape time, so old campaigns age out
            self.metrics.large_audience_max.labels(sender_id).set_function(
                lambda: self.largest.largest(sender_id))

    def _count(self, sender_id: str, reason: str, action: str) -> None:
        if self.metrics is not None:
            self.metrics.large_audience_refusals.labels(sender_id, reason, action).inc()

    def _refuse(self, settings: LargeAudienceSettings, sender_id: str, campaign: Campaign,
                audience: Audience, now) -> Verdict:
        self._count(sender_id, audience.basis, settings.action)
        if audience.basis == "declared":
            detail = f"{audience.declared} declared in {settings.size_header}"
        elif audience.basis == "lists":
            detail = (f"{audience.reached} reached: {audience.individuals} recipients and "
                      f"{audience.list_members} distribution-list members")
        else:  # the exact stores stop at threshold + 1; Redis estimates (0.81 %)
            detail = f"at least {audience.individuals} distinct recipients"
        head = (f"Campaign {campaign.label} has an audience over {self.threshold} university "
                f"addresses ({detail})")
        closes = self.hours.next_close(now)
        reopens = self.hours.next_open(closes) if closes is not None else None
        hours = self.hours.describe()
        if settings.action == "reject":
            text = f"{head}; large-audience sends may not be sent during business hours: {hours}"
            if closes is not None:
                text += f"; send it after {self.hours.format(closes)}"
            return reject(550, "5.7.1", text, "large_audience")
        text = f"{head}; large-audience sends are accepted outside business hours: {hours}"
        if closes is not None:
            text += f"; retry after {self.hours.format(closes)}"
            if reopens is not None:
                text += f" (accepted until {self.hours.format(reopens)})"
        return defer(451, "4.7.1", text, "large_audience")
