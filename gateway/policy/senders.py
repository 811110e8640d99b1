"""The sender registry: one TOML file per registered sending platform in ``config/senders/``.

A sender is identified by its client IP (its ``networks``), by SMTP AUTH, and by a return-path
that matches one of its ``return_path`` patterns. Validation guarantees that no two senders'
patterns can match the same address, so the return-path alone names exactly one sender.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from gateway.infra.config import CheckSettings, parse_checks, read_toml
from gateway.policy.passwords import check_hash_format
from gateway.message.address import valid_domain
from gateway.infra.typed import ConfigError, build

_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_SELECTOR = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")

# Message classes (policy IV.C.1): what a message declares in its message-class header.
MessageClass = Literal["transactional", "educational", "promotional"]
MESSAGE_CLASSES: tuple[str, ...] = get_args(MessageClass)


@dataclass(frozen=True)
class SenderAuth:
    username: str
    password_hash: str

    def validate(self, file, prefix):
        if not self.username or any(c.isspace() for c in self.username):
            raise ConfigError(file, f"{prefix}.username", "must be non-empty, without spaces")
        reason = check_hash_format(self.password_hash)
        if reason:
            raise ConfigError(file, f"{prefix}.password_hash", reason)


@dataclass(frozen=True)
class Sender:
    id: str
    organization: str
    contact: str
    networks: tuple[str, ...]
    domains: tuple[str, ...]
    return_path: tuple[str, ...]
    expires: dt.date
    description: str = ""
    # The message classes this sender may send (checks.message_class); absent header = promotional.
    classes: tuple[MessageClass, ...] = ("promotional",)
    # A lower sending rate than the policy ceiling ([limits] sender_rate), e.g. "10/minute".
    rate: str = ""
    # A recipients-per-period limit for this sender, e.g. "2000/minute" (stricter of this and
    # [limits] recipient_rate applies).
    recipient_rate: str = ""
    # The DKIM selectors the sender signs with, for `gateway senders verify` (onboarding).
    dkim_selectors: tuple[str, ...] = ()
    auth: SenderAuth | None = None
    file: Path | None = field(default=None, compare=False, metadata={"toml": False})
    checks: dict[str, CheckSettings] = field(default_factory=dict, compare=False,
                                             metadata={"toml": False})
    nets: tuple = field(init=False, repr=False, compare=False, default=())
    patterns: tuple = field(init=False, repr=False, compare=False, default=())
    patterns_rx: tuple = field(init=False, repr=False, compare=False, default=())

    def validate(self, file, prefix):
        if not _ID.match(self.id):
            raise ConfigError(file, "id", f"{self.id!r}: use lower-case letters, digits, . _ -")
        if self.id == "global":
            raise ConfigError(file, "id", "'global' is reserved for the gateway-wide throttle")
        for key in ("rate", "recipient_rate"):
            if getattr(self, key):
                from gateway.policy.rates import Rate

                try:
                    Rate.parse(getattr(self, key))
                except ValueError as exc:
                    raise ConfigError(file, key, str(exc)) from None
        for key in ("organization", "contact"):
            if not getattr(self, key).strip():
                raise ConfigError(file, key, "must not be empty")
        nets = []
        for i, cidr in enumerate(self.networks):
            try:
                nets.append(ipaddress.ip_network(cidr, strict=True))
            except ValueError as exc:
                raise ConfigError(file, f"networks[{i}]", f"bad CIDR: {exc}") from None
        if not nets:
            raise ConfigError(file, "networks", "needs at least one CIDR")
        if not self.domains:
            raise ConfigError(file, "domains", "needs at least one domain")
        for i, d in enumerate(self.domains):
            if d != d.lower() or not valid_domain(d):
                raise ConfigError(file, f"domains[{i}]", f"{d!r} is not a lower-case domain name")
        if not self.classes:
            raise ConfigError(file, "classes", "needs at least one message class "
                                               f"({', '.join(MESSAGE_CLASSES)})")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(file, "classes", "lists a message class more than once")
        for i, sel in enumerate(self.dkim_selectors):
            if not _SELECTOR.match(sel):
                raise ConfigError(file, f"dkim_selectors[{i}]", f"{sel!r} is not a DKIM "
                                  "selector (dot-separated labels of letters, digits, -, _)")
        if not self.return_path:
            raise ConfigError(file, "return_path", "needs at least one pattern")
        patterns = []
        for i, pat in enumerate(self.return_path):
            local, at, domain = pat.rpartition("@")
            key = f"return_path[{i}]"
            if not at or not local or "@" in local or "*" in domain or not valid_domain(domain):
                raise ConfigError(file, key, f"{pat!r}: expected local-pattern@domain, "
                                             "'*' only in the local part")
            if not any(domain == d or domain.endswith("." + d) for d in self.domains):
                raise ConfigError(file, key, f"{pat!r}: domain {domain} is not one of this "
                                             "sender's domains (or a subdomain of one)")
            patterns.append(pat.lower())
        object.__setattr__(self, "nets", tuple(nets))
        object.__setattr__(self, "patterns", tuple(patterns))
        object.__setattr__(self, "patterns_rx", tuple(_pattern_rx(p) for p in patterns))

    @functools.cached_property  # (read twice a message by the rate checks; a frozen Rate)
    def own_rate(self):
        """The sender's registered rate, or None for the policy ceiling."""
        from gateway.policy.rates import Rate

        return Rate.parse(self.rate) if self.rate else None

    @functools.cached_property
    def own_recipient_rate(self):
        from gateway.policy.rates import Rate

        return Rate.parse(self.recipient_rate) if self.recipient_rate else None

    def has_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.nets)

    def matches_return_path(self, address: str) -> bool:
        addr = address.lower()
        return any(rx.match(addr) for rx in self.patterns_rx)

    def expired(self, today: dt.date) -> bool:
        """The registration is valid through its ``expires`` date, inclusive."""
        return today > self.expires


def _pattern_rx(pattern: str) -> re.Pattern:
    """``bounce-*@em.vendor.example``: ``*`` matches any run of characters other than ``@``."""
    return re.compile("[^@]*".join(re.escape(part) for part in pattern.split("*")) + r"\Z")


@functools.lru_cache(maxsize=4096)
def globs_intersect(a: str, b: str) -> bool:
    """Can some string match both glob patterns (``*`` wildcards only)?"""
    if not a and not b:
        return True
    if a and a[0] == "*":
        return globs_intersect(a[1:], b) or (bool(b) and globs_intersect(a, b[1:]))
    if b and b[0] == "*":
        return globs_intersect(a, b[1:]) or (bool(a) and globs_intersect(a[1:], b))
    return bool(a) and bool(b) and a[0] == b[0] and globs_intersect(a[1:], b[1:])


def load_sender(path: Path, base_checks: dict[str, CheckSettings] | None = None) -> Sender:
    """One sender file; its ``[checks.NAME]`` tables override ``base_checks`` key by key."""
    data = read_toml(path)
    checks = data.pop("checks", {})
    return build(Sender, data, path, file=path,
                 checks=parse_checks(checks, path, "checks", base_checks or {}))


class Registry:
    """All registered senders, validated together, with the look-ups identification needs."""

    def __init__(self, senders: list[Sender] | tuple[Sender, ...]) -> None:
        self.senders = tuple(sorted(senders, key=lambda s: s.id))
        self.by_id: dict[str, Sender] = {}
        self.by_username: dict[str, Sender] = {}
        for s in self.senders:
            where = s.file or "<registry>"
            if s.id in self.by_id:
                raise ConfigError(where, "id", f"duplicate sender id {s.id!r} "
                                              f"(also in {self.by_id[s.id].file})")
            self.by_id[s.id] = s
            if s.auth:
                other = self.by_username.get(s.auth.username)
                if other:
                    raise ConfigError(where, "auth.username", f"{s.auth.username!r} is also "
                                                             f"used by sender {other.id!r}")
                self.by_username[s.auth.username] = s
        for i, a in enumerate(self.senders):
            for b in self.senders[i + 1:]:
                for pa in a.patterns:
                    for pb in b.patterns:
                        if globs_intersect(pa, pb):
                            raise ConfigError(
                                b.file or "<registry>", "return_path",
                                f"{pb!r} can match the same address as {pa!r} of sender "
                                f"{a.id!r}; the return-path must identify one sender")

    def for_ip(self, ip) -> tuple[Sender, ...]:
        return tuple(s for s in self.senders if s.has_ip(ip))

    def __len__(self) -> int:
        return len(self.senders)


def load_registry(directory: Path, base_checks: dict[str, CheckSettings] | None = None,
                  ceiling=None) -> Registry:
    """All sender files of ``directory``; a sender's ``rate`` may not exceed ``ceiling``."""
    if not directory.is_dir():
        raise ConfigError(directory, "", "sender directory not found")
    senders = [load_sender(p, base_checks) for p in sorted(directory.glob("*.toml"))]
    for s in senders:
        check_ceiling(s, ceiling)
    return Registry(senders)


def check_ceiling(sender: Sender, ceiling) -> None:
    """A sender's own ``rate`` may not exceed ``ceiling`` ([limits] sender_rate)."""
    own = sender.own_rate
    if ceiling is not None and own is not None and own.per_second > ceiling.per_second:
        raise ConfigError(sender.file or "<registry>", "rate", f"{sender.rate} exceeds the policy "
                          f"ceiling [limits] sender_rate = {ceiling}")
