"""What an audience is, for policy IV.B.3.c.iv ("messages to audiences containing over 15,000
university email addresses may not be sent during business hours").

A vendor sends one campaign as many messages, each to some of its recipients, so the audience of
a message is the audience of its **campaign**. The campaign is named by the first of the
configured headers the message carries (by default the identifiers of ``Feedback-ID`` before its
SenderId, then ``X-Campaign-ID``, then the ``List-Id``); a message with none of them belongs to
the campaign of its fingerprint: the registered sender, the From: address and the normalized
Subject. Campaigns are per registered sender.

The audience size of a campaign is the largest of

- the size it declares (``X-Audience-Size`` by default),
- the university recipients it reached within ``[business_hours] window``: the distinct
  individual recipients, counted in the state store as keyed hashes (so gateways sharing a Redis
  count one audience together), plus the members of every university distribution list
  (``[[university.lists]]``) it was addressed to. Lists and individuals may overlap; their sum is
  the upper bound, which is what the policy needs (the cost of an overestimate is a send moved
  after hours, the cost of an underestimate a breach).

Recipients are never stored in clear: each one is an HMAC-SHA-256 of the lower-cased address
with the key of the mail log's recipient hashing (``[logging] hash_key_file``), truncated exactly
as in the log. Gateways that share a Redis must therefore share that key file, or one recipient
seen by two gateways counts twice.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import hashlib
import hmac
import re
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

from gateway.infra.clock import Clock
from gateway.message.address import plain_header_address
from gateway.state import Store

_SHOWN = 60  # characters of a campaign identifier shown in replies and logs
_REPLY_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|sv|antw)\s*(?:\[\d+\])?\s*:\s*)+",
                           re.IGNORECASE)


def recipient_hash(key: bytes, address: str) -> str:
    """An address as a keyed hash: the same value as the mail log's hashed recipients
    (gateway.ops.maillog.MailLog.rcpt_id with ``recipients = "hashed"``)."""
    return hmac.new(key, address.lower().encode(), hashlib.sha256).hexdigest()[:20]


def _printable(value: str) -> str:
    text = "".join(c if " " <= c <= "~" else "?" for c in " ".join(value.split()))
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _header(message: Message | None, name: str) -> str | None:
    if message is None:
        return None
    value = message.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())  # unfolded (compat32 keeps the folding)


def campaign_part(name: str, value: str) -> str:
    """The campaign identifier in header ``name``'s ``value`` ("" if it names none).

    ``Feedback-ID: CampaignId:CustomerId:MailTypeId:SenderId`` (Google's convention): every
    identifier before the last, the SenderId, which is the same for all of a sender's mail.
    ``List-Id: Description <list-id>`` (RFC 2919): the list-id, lower-cased. Other headers: the
    value, whitespace collapsed.
    """
    value = value.strip()
    if name.lower() == "feedback-id":
        fields = [f.strip() for f in value.split(":")]
        return ":".join(fields[:-1]) if len(fields) > 1 and any(fields[:-1]) else ""
    if name.lower() == "list-id":
        inner = re.search(r"<([^<>]+)>", value)
        return (inner.group(1) if inner else value).strip().lower()
    return value


def normalized_subject(message: Message | None) -> str:
    """The Subject decoded (RFC 2047), NFKC, case-folded, reply/forward prefixes dropped and
    whitespace collapsed, so that re-sends and re-encodings of one subject match."""
    raw = message.get("Subject") if message is not None else None
    if raw is None:
        return ""
    text = str(raw)
    # ASCII without "=?" holds no encoded word: decode_header gives it back as one unencoded
    # chunk, and make_header's str() of that is the text itself
    if not text.isascii() or "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
            text = str(raw)
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_REPLY_PREFIX.sub("", " ".join(text.split())).split())


def from_address(message: Message | None) -> str:
    """The From: address as parseaddr reads it, lower-cased (part of the stored campaign keys:
    any change here must keep them byte-identical; tests/test_campaign_keys.py)."""
    raw = message.get("From") if message is not None else None
    if raw is None:
        return ""
    text = str(raw)
    plain = plain_header_address(text)  # most From: values: no parse needed
    return (plain if plain is not None else email.utils.parseaddr(text)[1]).lower()


@dataclass(frozen=True)
class Campaign:
    key: str  # opaque, for the state store (a keyed hash: no subject or address in clear)
    source: str  # the header that named it, or "fingerprint"
    label: str  # printable, for replies and logs


def identify(message: Message | None, sender_id: str, headers: Iterable[str],
             key: bytes) -> Campaign:
    """The campaign of ``message``: the first of ``headers`` naming one, else the fingerprint."""

    def keyed(*parts: str) -> str:
        data = "\0".join((sender_id, *parts)).encode("utf-8", "surrogateescape")
        return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]

    for name in headers:
        value = _header(message, name)
        ident = campaign_part(name, value) if value is not None else ""
        if ident:
            return Campaign(keyed(name.lower(), ident), name, f"{name} {_printable(ident)}")
    subject, sender = normalized_subject(message), from_address(message)
    digest = keyed("fingerprint", sender, subject)
    return Campaign(digest, "fingerprint", f"fingerprint {digest[:12]}")


def declared_size(message: Message | None, header: str) -> int | None:
    """The audience size the message declares in ``header`` (the largest, if repeated); values
    that are not a whole number ("20000", "20,000") are ignored."""
    values = message.get_all(header) if message is not None else None
    sizes = []
    for value in values or ():
        text = str(value).strip().replace(",", "").replace("_", "")
        if text.isascii() and text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else None


@dataclass(frozen=True)
class Audience:
    declared: int | None  # from the declared-size header
    individuals: int  # distinct individual university recipients reached within the window
    list_members: int  # members of the distribution lists the campaign was addressed to

    @property
    def reached(self) -> int:
        return self.individuals + self.list_members

    @property
    def size(self) -> int:
        return max(self.declared or 0, self.reached)

    @property
    def basis(self) -> str:
        """What makes the size: "declared", "lists" (lists in what was reached) or "observed"."""
        if self.declared is not None and self.declared >= self.reached:
            return "declared"
        return "lists" if self.list_members else "observed"


async def measure(store: Store, campaign: Campaign, individuals: list[str],
                  lists: dict[str, int], window: float, limit: int) -> tuple[int, int]:
    """Record this message's recipients for ``campaign`` and return (distinct individuals,
    distribution-list members) reached within ``window``.

    ``individuals`` are keyed hashes; ``lists`` maps each list's keyed hash to its member count.
    A list adds its members once per campaign and window: an atomic counter per (campaign, list)
    says which message addressed it first, and only that message adds the members to the
    campaign's list total, so gateways sharing a store neither miss nor double a list. The list
    total is read in the same round trip as the count (a message addressing no new list, most
    of them, costs the store one call).
    """
    base = f"audience:{campaign.key}"
    count, raw = await store.count_distinct_and_get(f"{base}:rcpt", individuals, window, limit,
                                                    f"{base}:lists")
    members = int(raw) if raw is not None else 0
    for list_key, size in lists.items():
        if await store.incr(f"{base}:list:{list_key}", 1, ttl=window) == 1:
            members = await store.incr(f"{base}:lists", size, ttl=window)
    return count, members


async def peek(store: Store, campaign: Campaign, individuals: list[str], lists: dict[str, int],
               window: float) -> tuple[int, int]:
    """What :func:`measure` would return for this message, without recording anything: the
    distinct individuals so far plus this message's (an upper bound), and the list members so
    far plus the lists not yet counted (for ``gateway explain``)."""
    base = f"audience:{campaign.key}"
    count, raw = await store.count_distinct_and_get(f"{base}:rcpt", [], window, None,
                                                    f"{base}:lists")
    members = int(raw or 0)
    for list_key, size in lists.items():
        if await store.get(f"{base}:list:{list_key}") is None:
            members += size
    return count + len(set(individuals)), members


async def crossed(store: Store, campaign: Campaign, window: float) -> bool:
    """Called for a campaign over the threshold: True for the first such call in the window
    (across every gateway sharing the store), so the crossing is logged and counted once."""
    return await store.incr(f"audience:{campaign.key}:over", 1, ttl=window) == 1


class LargestCampaigns:
    """The largest audiences of each sender's active campaigns (seen within the window), for a
    gauge labelled by sender only: a few campaigns per sender are kept, the smallest dropped."""

    def __init__(self, clock: Clock, window: float, keep: int = 8) -> None:
        self.clock, self.window, self.keep = clock, window, keep
        self._lock = threading.Lock()  # scrapes may read from another thread
        self._by_sender: dict[str, dict[str, tuple[int, float, str]]] = {}

    def observe(self, sender: str, campaign: str, size: int, label: str = "") -> None:
        now = self.clock.now().timestamp()
        with self._lock:
            seen = self._by_sender.setdefault(sender, {})
            seen[campaign] = (size, now + self.window, label or campaign)
            self._prune(seen, now)

    def _prune(self, seen: dict[str, tuple[int, float, str]], now: float) -> None:
        for name in [n for n, (_, until, _) in seen.items() if until <= now]:
            del seen[name]
        while len(seen) > self.keep:
            del seen[min(seen, key=lambda n: seen[n][0])]

    def largest(self, sender: str) -> int:
        with self._lock:
            seen = self._by_sender.get(sender, {})
            self._prune(seen, self.clock.now().timestamp())
            return max((size for size, _, _ in seen.values()), default=0)

    def active(self, sender: str) -> list[tuple[str, int]]:
        """(label, audience) of the sender's campaigns seen within the window, largest first."""
        with self._lock:
            seen = self._by_sender.get(sender, {})
            self._prune(seen, self.clock.now().timestamp())
            return sorted(((label, size) for size, _, label in seen.values()),
                          key=lambda item: -item[1])
