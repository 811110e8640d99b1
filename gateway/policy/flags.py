"""Recipient flags and preferences, kept so that a copy of the state store does not reveal who
carries them.

Policy IV.C.1.b: students with FERPA privacy flags only receive messages related to educational
business. IV.C.4.a: Do Not Email and Do Not Contact flags are respected. IV.C.4.b and IV.C.5.b:
preferences kept in systems of record are honoured. IV.B.3 (exception process, item 8):
preferences (opt-outs) flow back to the system of record.

What is stored, per flag, is a set of *members*: HMAC-SHA-256 of the normalized address with the
key of ``[flags] key_file`` (truncated to 128 bits, hex). Without the key a member cannot be
tied to an address, not even by hashing a list of candidate addresses. The sets are named:

* ``ferpa``, ``do_not_email``, ``do_not_contact``: imported from the systems of record;
* ``opt_out``, ``opt_out/sender:ID``, ``opt_out/org:ORGANIZATION``: opt-outs imported from a
  system of record, for everything, one registered sender, or one organization;
* ``unsubscribed``, ``unsubscribed/sender:ID``, ``unsubscribed/org:ORGANIZATION``: opt-outs the
  gateway recorded itself (the one-click unsubscribe endpoint); the ``opt_out`` rule applies.

Opt-outs the gateway records must go back to the system of record, so for those alone the
address is also kept, sealed (XSalsa20-Poly1305, PyNaCl's SecretBox, with a key derived from
the key file), under ``optout:MEMBER[/SCOPE]``; ``gateway flags export-optouts`` opens them.
Whoever holds both the store and the key file can read those addresses, and can test any
candidate address against every set anyway: keep the key file as private as the systems of
record themselves.

Rules (``checks.recipient_flags``) are named in logs only by an opaque id derived from the key
(:meth:`FlagKeys.rule_id`), so no log line names a flag; ``gateway flags list`` shows the ids.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.message.address import AddressError, parse_mailbox

if TYPE_CHECKING:
    from gateway.infra.config import Config
    from gateway.policy.senders import Sender
    from gateway.state import Store

FERPA = "ferpa"
DO_NOT_EMAIL = "do_not_email"
DO_NOT_CONTACT = "do_not_contact"
OPT_OUT = "opt_out"
RULES: tuple[str, ...] = (FERPA, DO_NOT_EMAIL, DO_NOT_CONTACT, OPT_OUT)  # one rule per flag kind
UNSUBSCRIBED = "unsubscribed"  # opt-outs recorded by the gateway; the opt_out rule applies
SCOPED = (OPT_OUT, UNSUBSCRIBED)  # the kinds that may be scoped to a sender or organization
KINDS = (*RULES, UNSUBSCRIBED)
RECORD_PREFIX = "optout:"
_KEY_ID = "flags:key-id"  # a fingerprint of the key the sets were built with (not the key)
_MEMBER_HEX = 32  # 128 bits of HMAC-SHA-256


class FlagKeyMismatch(Exception):
    """The key file is not the one the flags in the store were built with."""


@dataclass(frozen=True)
class Scope:
    """Whom an opt-out is about: every sender, one registered sender, or one organization."""

    kind: Literal["global", "sender", "organization"] = "global"
    value: str = ""

    @staticmethod
    def of(sender: str | None = None, organization: str | None = None) -> Scope:
        if sender and organization:
            raise ValueError("an opt-out is for a sender or an organization, not both")
        if sender:
            return Scope("sender", sender)
        if organization:
            return Scope("organization", organization_key(organization))
        return Scope()

    @property
    def suffix(self) -> str:
        if self.kind == "global":
            return ""
        return f"/{'sender' if self.kind == 'sender' else 'org'}:{self.value}"

    def describe(self) -> str:
        return {"global": "every sender", "sender": f"sender {self.value}",
                "organization": f"organization {self.value!r}"}[self.kind]


def organization_key(name: str) -> str:
    """Organizations are compared case- and space-insensitively."""
    return " ".join(name.split()).casefold()


def set_name(kind: str, scope: Scope = Scope()) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown flag {kind!r} (known: {', '.join(KINDS)})")
    if scope.kind != "global" and kind not in SCOPED:
        raise ValueError(f"{kind} is not scoped to a sender or organization")
    return kind + scope.suffix


def parse_set_name(name: str) -> tuple[str, Scope]:
    kind, _, rest = name.partition("/")
    if not rest:
        return kind, Scope()
    what, _, value = rest.partition(":")
    return kind, Scope("sender" if what == "sender" else "organization", value)


def rule_of(name: str) -> str:
    """The rule (one of RULES) a stored set falls under."""
    kind = name.partition("/")[0]
    return OPT_OUT if kind == UNSUBSCRIBED else kind


def sets_for(sender: Sender | None) -> list[str]:
    """Every set that can restrict mail from ``sender`` (None: an unidentified sender)."""
    names = [FERPA, DO_NOT_EMAIL, DO_NOT_CONTACT, OPT_OUT, UNSUBSCRIBED]
    if sender is not None:
        for kind in SCOPED:
            names.append(set_name(kind, Scope("sender", sender.id)))
            names.append(set_name(kind, Scope("organization",
                                              organization_key(sender.organization))))
    return names


def normalize(address: str, subaddress_separator: str = "+", *, parsed: bool = False) -> str:
    """The form that is hashed: a strict mailbox (``<...>`` allowed), lower-cased, without the
    subaddress (``alice+news@`` is ``alice@``), so a vendor cannot step round a flag by
    writing the address differently. Raises AddressError. ``parsed``: the address is already
    a mailbox the SMTP front parsed (``str(Mailbox)``), so it is not parsed again."""
    if parsed:
        local, _, domain = address.rpartition("@")
    else:
        text = address.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        mailbox = parse_mailbox(text)
        local, domain = mailbox.local, mailbox.domain
    if subaddress_separator and not local.startswith('"'):
        local = local.split(subaddress_separator, 1)[0] or local
    return f"{local}@{domain}".lower()


class FlagKeys:
    """Everything derived from the flags key: member hashes, rule ids, the sealing keys."""

    def __init__(self, key: bytes, subaddress_separator: str = "+") -> None:
        if len(key) < 16:
            raise ValueError("the flags key must be at least 16 bytes")
        self._key = key
        self.subaddress_separator = subaddress_separator
        # HMAC-SHA-256 (RFC 2104) with the keyed inner and outer states computed once: the
        # same digest as hmac.digest(key, ...), at a third of the cost per address
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def _derive(self, label: str) -> bytes:
        return hmac.new(self._key, b"ecomm-gateway\0" + label.encode(), hashlib.sha256).digest()

    def member(self, address: str, *, parsed: bool = False) -> str:
        """The stored form of ``address``. Raises AddressError for a malformed address."""
        if parsed:  # the hot path (every recipient of every message): normalize(), inlined
            local, _, domain = address.rpartition("@")
            sep = self.subaddress_separator
            if sep and sep in local and local[0] != '"':
                local = local.split(sep, 1)[0] or local
            normal = f"{local}@{domain}".lower()
        else:
            normal = normalize(address, self.subaddress_separator)
        inner = self._inner.copy()
        inner.update(normal.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:_MEMBER_HEX]

    def rule_id(self, rule: str) -> str:
        """The opaque name of a rule in logs: stable for a key, meaningless without it."""
        return "r" + self._derive("rule:" + rule).hex()[:8]

    @property
    def key_id(self) -> str:
        return self._derive("key-id").hex()[:16]

    def box(self, purpose: str):
        from nacl.secret import SecretBox

        return SecretBox(self._derive("box:" + purpose))


@dataclass(frozen=True)
class OptOutRecord:
    """An opt-out the gateway recorded, as exported for the system of record."""

    address: str
    scope: Scope
    sender: str | None
    organization: str | None
    recorded_at: str  # ISO 8601, UTC
    source: str  # "unsubscribe" (the one-click endpoint)


class FlagStore:
    """Flags in the state backend: keyed hashes in, set names out."""

    def __init__(self, store: Store, keys: FlagKeys) -> None:
        self.store, self.keys = store, keys

    def member(self, address: str) -> str:
        return self.keys.member(address)

    async def lookup(self, addresses: Sequence[str], names: Sequence[str], *,
                     parsed: bool = False) -> dict[str, frozenset[str]]:
        """The sets among ``names`` that each address is in (addresses in none are left out);
        one round trip to the store for all of them. ``parsed``: see :func:`normalize`."""
        members: dict[str, str] = {}
        member = self.keys.member
        for address in addresses:
            try:
                members[address] = member(address, parsed=parsed)
            except AddressError:
                continue  # the SMTP front refuses those before any check sees them
        found = await self.store.flag_lookup(list(names), list(set(members.values())))
        return {a: frozenset(found[m]) for a, m in members.items() if found.get(m)}

    async def check_key(self, claim: bool = False) -> None:
        """Refuse a key other than the one the stored sets were built with: with another key
        every flag would silently stop matching. ``claim`` records this key when none is."""
        stored = await self.store.get(_KEY_ID)
        if stored is None:
            if claim:
                await self.store.set(_KEY_ID, self.keys.key_id.encode())
            return
        if stored.decode() != self.keys.key_id:
            raise FlagKeyMismatch(
                "the flags key file is not the key the flags in the state store were built "
                "with (restore the key file, or re-import every flag list with this key)")

    async def add(self, name: str, members: Sequence[str]) -> int:
        await self.check_key(claim=True)
        return await self.store.flag_add(name, list(members))

    async def remove(self, name: str, members: Sequence[str]) -> int:
        return await self.store.flag_remove(name, list(members))

    async def replace(self, name: str, members: Iterable[str]) -> int:
        await self.check_key(claim=True)
        return await self.store.flag_replace(name, members)

    async def counts(self) -> dict[str, int]:
        return await self.store.flag_counts()

    async def flags_of(self, address: str) -> list[str]:
        """Every stored set ``address`` is in (for administrators)."""
        names = list(await self.store.flag_counts())
        found = await self.store.flag_lookup(names, [self.keys.member(address)])
        return sorted(next(iter(found.values()), ()))

    # --- opt-outs recorded by the gateway -------------------------------------------------

    async def record_optout(self, address: str, scope: Scope, *, sender: str | None,
                            organization: str | None, at: dt.datetime,
                            source: str = "unsubscribe") -> bool:
        """Record an opt-out: the member joins ``unsubscribed[/scope]`` and the address is kept
        sealed for the export. Idempotent; True when it was not recorded before."""
        member = self.keys.member(address)
        name = set_name(UNSUBSCRIBED, scope)
        key = RECORD_PREFIX + member + scope.suffix
        if await self.store.get(key) is None:
            record = {"a": normalize(address, ""), "k": scope.kind, "v": scope.value,
                      "s": sender, "o": organization,
                      "t": at.astimezone(dt.timezone.utc).isoformat(timespec="seconds"),
                      "src": source}
            sealed = self.keys.box("optout-record").encrypt(json.dumps(record).encode())
            await self.store.set(key, bytes(sealed))
        return await self.add(name, [member]) > 0

    async def forget_optout(self, address: str, scope: Scope) -> bool:
        """Remove an opt-out the gateway recorded (and its sealed record)."""
        member = self.keys.member(address)
        await self.store.delete(RECORD_PREFIX + member + scope.suffix)
        return await self.remove(set_name(UNSUBSCRIBED, scope), [member]) > 0

    async def optout_records(self) -> list[OptOutRecord]:
        """Every opt-out recorded by the gateway, addresses opened, oldest first."""
        from nacl.exceptions import CryptoError

        box = self.keys.box("optout-record")
        out = []
        for key, sealed in (await self.store.scan(RECORD_PREFIX)).items():
            try:
                data = json.loads(box.decrypt(sealed))
            except (CryptoError, ValueError):
                raise FlagKeyMismatch(f"cannot open the opt-out record {key} with this key "
                                      "file") from None
            out.append(OptOutRecord(data["a"], Scope(data["k"], data["v"]), data["s"],
                                    data["o"], data["t"], data["src"]))
        return sorted(out, key=lambda r: (r.recorded_at, r.address))


def load_keys(config: Config) -> FlagKeys:
    """The flags key of ``[flags] key_file`` (created with random bytes on first use)."""
    from gateway.ops.maillog import load_hash_key

    return FlagKeys(load_hash_key(config.path(config.flags.key_file)),
                    config.flags.subaddress_separator)


def open_flags(config: Config, store: Store) -> FlagStore:
    return FlagStore(store, load_keys(config))
