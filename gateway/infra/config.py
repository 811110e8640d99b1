"""The gateway's configuration: ``gateway.toml`` read with tomllib into frozen dataclasses.

Every key is documented in the shipped ``gateway.toml``. Relative paths are taken relative to the
directory of the configuration file, so the gateway runs the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from gateway.message.address import DomainSet
from gateway.infra.typed import ConfigError, build

Mode = Literal["enforce", "monitor", "off"]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` -> (host, port); port 0 picks a free port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [addr]:port)")
    return host, int(port)


def _check_listen(file, key: str, value: str) -> None:
    try:
        host, _ = parse_hostport(value)
        if host not in ("localhost", "*"):
            ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(file, key, str(exc)) from None


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    hostname: str = "ecomm-gateway.localhost"
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_received: int = 100
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    timeout: float = 300.0
    event_loop: str = "auto"  # "asyncio", "uvloop" or "auto" (gateway/infra/event_loop.py)

    def validate(self, file, prefix):
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(file, f"{prefix}.event_loop",
                              'must be "auto", "asyncio" or "uvloop"')
        # (empty: no SMTP front; then [milter] listen must name one: see load_config)
        for i, item in enumerate(self.listen):
            _check_listen(file, f"{prefix}.listen[{i}]", item)
        if self.max_message_size < 1024:
            raise ConfigError(file, f"{prefix}.max_message_size", "must be at least 1024 bytes")
        if self.max_recipients < 1:
            raise ConfigError(file, f"{prefix}.max_recipients", "must be at least 1")
        if self.max_received < 1:
            raise ConfigError(file, f"{prefix}.max_received", "must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(file, f"{prefix}.tls_key", "tls_cert and tls_key go together")
        if self.require_tls and self.tls_cert is None:
            raise ConfigError(file, f"{prefix}.require_tls", "needs tls_cert and tls_key")
        if self.timeout <= 0:
            raise ConfigError(file, f"{prefix}.timeout", "must be positive")


@dataclass(frozen=True)
class MilterConfig:
    # "inet:host:port" (IPv6 as inet:[addr]:port) or "unix:/path"; empty: no milter front
    listen: tuple[str, ...] = ()
    socket_mode: str = "0660"  # permissions of a unix: socket (octal), for Postfix's group
    # seconds to wait for the MTA's next packet before closing the connection; above Postfix's
    # smtpd_timeout (300 s), since the MTA waits on its own client between packets
    timeout: float = 600.0
    max_connections: int = 1000  # MTA connections open at once (one per Postfix smtpd session)

    def validate(self, file, prefix):
        for i, item in enumerate(self.listen):
            key = f"{prefix}.listen[{i}]"
            if item.startswith("unix:"):
                if not item[5:].startswith("/"):
                    raise ConfigError(file, key, f"{item!r}: expected unix:/absolute/path")
            elif item.startswith("inet:"):
                _check_listen(file, key, item[5:])
            else:
                raise ConfigError(file, key, f"{item!r}: expected inet:host:port or unix:/path")
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ConfigError(file, f"{prefix}.socket_mode", f"{self.socket_mode!r}: expected "
                              "an octal mode such as \"0660\"")
        if self.timeout <= 0:
            raise ConfigError(file, f"{prefix}.timeout", "must be positive")
        if self.max_connections < 1:
            raise ConfigError(file, f"{prefix}.max_connections", "must be at least 1")


UPSTREAM_SCHEMES = ("smtp", "smtps")


def check_upstream_url(file, key: str, url: str) -> None:
    if url.startswith("maildir:"):
        if not url[len("maildir:"):]:
            raise ConfigError(file, key, "maildir: needs a path, e.g. maildir:var/maildir")
        return
    parts = urlsplit(url)
    if parts.scheme not in UPSTREAM_SCHEMES or not parts.hostname:
        raise ConfigError(file, key, f"{url!r}: expected smtp://host:port, smtps://host:port "
                                     "or maildir:PATH")
    try:
        parts.port
    except ValueError:
        raise ConfigError(file, key, f"{url!r}: bad port") from None


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "maildir:var/maildir"
    hosts: tuple[str, ...] = ()
    starttls: Literal["required", "opportunistic", "off"] = "opportunistic"
    tls_verify: bool = True
    ca_file: Path | None = None
    pool_size: int = 20
    timeout: float = 60.0
    idle_timeout: float = 30.0
    pool_wait: float = 30.0
    sender_share: float = 0.5
    transaction_idle: float = 30.0
    probe: bool = True
    unreachable_grace: float = 60.0
    chunking: bool = True

    def validate(self, file, prefix):
        check_upstream_url(file, f"{prefix}.url", self.url)
        for i, url in enumerate(self.hosts):
            check_upstream_url(file, f"{prefix}.hosts[{i}]", url)
            if url.startswith("maildir:"):
                raise ConfigError(file, f"{prefix}.hosts[{i}]", "failover hosts must be smtp(s)://")
        if self.hosts and self.url.startswith("maildir:"):
            raise ConfigError(file, f"{prefix}.hosts", "failover hosts need an smtp(s):// url")
        if self.pool_size < 1:
            raise ConfigError(file, f"{prefix}.pool_size", "must be at least 1")
        if self.timeout <= 0 or self.idle_timeout < 0:
            raise ConfigError(file, f"{prefix}.timeout", "timeouts must be positive")
        if not 0 < self.pool_wait <= self.timeout:
            raise ConfigError(file, f"{prefix}.pool_wait", "must be positive and at most "
                              "timeout")
        if not 0 < self.sender_share <= 1:
            raise ConfigError(file, f"{prefix}.sender_share", "must be in (0, 1]")
        if self.transaction_idle <= 0:
            raise ConfigError(file, f"{prefix}.transaction_idle", "must be positive")
        if self.unreachable_grace < 0:
            raise ConfigError(file, f"{prefix}.unreachable_grace", "must be 0 or more seconds")

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.hosts)


@dataclass(frozen=True)
class StateConfig:
    url: str = "sqlite:var/state.sqlite3"
    on_error: Literal["defer", "local"] = "defer"

    def validate(self, file, prefix):
        url = self.url
        ok = (url == "memory:" or (url.startswith("sqlite:") and len(url) > 7)
              or (url.startswith(("redis://", "rediss://")) and urlsplit(url).hostname))
        if not ok:
            raise ConfigError(file, f"{prefix}.url", f"{url!r}: expected sqlite:PATH, "
                                                     "redis://host:port/db or memory:")


def _check_rate(file, key: str, text: str) -> None:
    from gateway.policy.rates import Rate

    try:
        Rate.parse(text)
    except ValueError as exc:
        raise ConfigError(file, key, str(exc)) from None


POLICY_SENDER_RATE = "30/minute"  # policy IV.B.3.c.vi: the most one sender may send


@dataclass(frozen=True)
class LimitsConfig:
    sender_rate: str = "30/minute"
    global_rate: str = ""
    recipient_rate: str = ""
    max_hold: float = 10.0
    sessions_per_sender: int = 20
    sessions_per_ip: int = 50
    sessions_total: int = 500
    connection_rate: str = "600/minute"
    auth_failures_per_session: int = 3
    auth_lockout: int = 10
    auth_window: float = 900.0
    auth_delay: float = 1.0
    auth_max_delay: float = 8.0
    auth_concurrency: int = 2
    throttle_refresh: float = 1.0
    adaptive: bool = False
    adaptive_floor: str = "30/minute"
    adaptive_decrease: float = 0.5
    adaptive_increase: float = 0.1
    adaptive_interval: float = 10.0
    adaptive_latency: float = 5.0
    # A sender_rate above the policy's 30/minute is refused unless this is true (then the start
    # logs a warning): the ceiling is the policy's, not a tuning knob.
    allow_above_policy: bool = False

    def validate(self, file, prefix):
        _check_rate(file, f"{prefix}.sender_rate", self.sender_rate)
        if self.above_policy and not self.allow_above_policy:
            raise ConfigError(file, f"{prefix}.sender_rate", f"{self.sender_rate} is above the "
                              f"policy's {POLICY_SENDER_RATE} (IV.B.3.c.vi); set [limits] "
                              "allow_above_policy = true to mean it")
        for key in ("global_rate", "recipient_rate", "connection_rate"):
            if getattr(self, key):
                _check_rate(file, f"{prefix}.{key}", getattr(self, key))
        _check_rate(file, f"{prefix}.adaptive_floor", self.adaptive_floor)
        if not 0 <= self.max_hold <= 300:
            raise ConfigError(file, f"{prefix}.max_hold", "must be between 0 and 300 seconds "
                              "(well inside the RFC 5321 10-minute DATA timeout)")
        for key in ("sessions_per_sender", "sessions_per_ip", "sessions_total",
                    "auth_lockout", "auth_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(file, f"{prefix}.{key}", "must be at least 1")
        if not 1 <= self.auth_failures_per_session <= 5:
            raise ConfigError(file, f"{prefix}.auth_failures_per_session",
                              "must be between 1 and 5")
        if self.auth_window <= 0:
            raise ConfigError(file, f"{prefix}.auth_window", "must be positive")
        if not 0 <= self.auth_delay <= self.auth_max_delay <= 60:
            raise ConfigError(file, f"{prefix}.auth_max_delay", "need 0 <= auth_delay <= "
                              "auth_max_delay <= 60 seconds")
        if self.adaptive and not self.global_rate:
            raise ConfigError(file, f"{prefix}.adaptive", "needs global_rate (the rate to adapt)")
        if not 0 < self.adaptive_decrease < 1:
            raise ConfigError(file, f"{prefix}.adaptive_decrease", "must be between 0 and 1")
        if not 0 < self.adaptive_increase <= 1:
            raise ConfigError(file, f"{prefix}.adaptive_increase", "must be in (0, 1]")
        if self.throttle_refresh <= 0 or self.adaptive_interval <= 0 or self.adaptive_latency <= 0:
            raise ConfigError(file, f"{prefix}.throttle_refresh", "intervals must be positive")

    @property
    def ceiling(self):
        from gateway.policy.rates import Rate

        return Rate.parse(self.sender_rate)

    @property
    def above_policy(self) -> bool:
        """sender_rate allows more than the policy's 30 messages a minute."""
        from gateway.policy.rates import Rate

        return self.ceiling.per_second > Rate.parse(POLICY_SENDER_RATE).per_second


@dataclass(frozen=True)
class UniversityList:
    """A university distribution list (``[[university.lists]]``): mail to its address reaches
    ``members`` university addresses (policy IV.B.3.c.iv counts them as the audience)."""

    address: str
    members: int

    def validate(self, file, prefix):
        from gateway.message.address import AddressError, parse_mailbox

        try:
            parse_mailbox(self.address)
        except AddressError as exc:
            raise ConfigError(file, f"{prefix}.address", f"{self.address!r}: {exc}") from None
        if self.members < 1:
            raise ConfigError(file, f"{prefix}.members", "must be at least 1")


@dataclass(frozen=True)
class UniversityConfig:
    domains: tuple[str, ...] = ("example.edu", "*.example.edu")
    lists: tuple[UniversityList, ...] = ()

    def validate(self, file, prefix):
        if not self.domains:
            raise ConfigError(file, f"{prefix}.domains", "needs at least one domain")
        for i, d in enumerate(self.domains):
            reason = DomainSet.pattern_error(d)
            if reason:
                raise ConfigError(file, f"{prefix}.domains[{i}]", reason)
        domains, seen = DomainSet(self.domains), set()
        for i, lst in enumerate(self.lists):
            key = f"{prefix}.lists[{i}].address"
            if lst.address.rpartition("@")[2].lower() not in domains:
                raise ConfigError(file, key, f"{lst.address!r} is not in a university domain")
            if lst.address.lower() in seen:
                raise ConfigError(file, key, f"{lst.address!r} is listed twice")
            seen.add(lst.address.lower())


@dataclass(frozen=True)
class BusinessHoursConfig:
    """Policy IV.B.3.c.iv: business hours, and the audience size not to be sent to in them."""

    timezone: str = "America/Denver"
    days: tuple[str, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri")
    start: str = "08:00"
    end: str = "17:00"
    holidays: tuple[dt.date, ...] = ()
    large_audience: int = 15000
    window: str = "7d"

    def validate(self, file, prefix):
        from gateway.policy import business_hours as bh
        from gateway.policy.rates import parse_duration

        try:
            bh.load_zone(self.timezone)
        except ValueError as exc:
            raise ConfigError(file, f"{prefix}.timezone", str(exc)) from None
        if not self.days:
            raise ConfigError(file, f"{prefix}.days", "needs at least one day (Mon ... Sun)")
        for i, day in enumerate(self.days):
            try:
                bh.parse_day(day)
            except ValueError as exc:
                raise ConfigError(file, f"{prefix}.days[{i}]", str(exc)) from None
        try:
            start = bh.parse_hhmm(self.start)
        except ValueError as exc:
            raise ConfigError(file, f"{prefix}.start", str(exc)) from None
        try:
            end = bh.parse_hhmm(self.end, allow_24=True)
        except ValueError as exc:
            raise ConfigError(file, f"{prefix}.end", str(exc)) from None
        if end <= start:
            raise ConfigError(file, f"{prefix}.end", f"{self.end!r} must be later than start "
                              f"{self.start!r} (hours within one day)")
        if self.large_audience < 1:
            raise ConfigError(file, f"{prefix}.large_audience", "must be at least 1")
        try:
            parse_duration(self.window)
        except ValueError as exc:
            raise ConfigError(file, f"{prefix}.window", str(exc)) from None

    @property
    def window_seconds(self) -> float:
        from gateway.policy.rates import parse_duration

        return parse_duration(self.window)


@dataclass(frozen=True)
class SendersConfig:
    dir: Path = Path("config/senders")


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1:9025"
    token_file: Path = Path("var/admin.token")
    token_dir: Path | None = None
    watch_interval: float = 15.0

    def validate(self, file, prefix):
        _check_listen(file, f"{prefix}.listen", self.listen)
        if self.watch_interval <= 0:
            raise ConfigError(file, f"{prefix}.watch_interval", "must be positive")


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    recipients: Literal["hashed", "clear"] = "hashed"
    hash_key_file: Path = Path("var/recipient-hash.key")
    file: Path | None = None
    audit_file: Path = Path("var/audit.jsonl")


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0
    cache_size: int = 10000
    threads: int = 4

    def validate(self, file, prefix):
        from gateway.infra.dns import parse_nameserver

        for i, item in enumerate(self.nameservers):
            try:
                parse_nameserver(item)
            except ValueError as exc:
                raise ConfigError(file, f"{prefix}.nameservers[{i}]",
                                  f"expected \"ip\" or \"ip:port\" ([ipv6]:port): {exc}") from None
        if self.timeout <= 0:
            raise ConfigError(file, f"{prefix}.timeout", "must be positive")
        if self.cache_size < 0:
            raise ConfigError(file, f"{prefix}.cache_size", "must be 0 (no cache) or more")
        if self.threads < 1:
            raise ConfigError(file, f"{prefix}.threads", "must be at least 1")


@dataclass(frozen=True)
class ArcConfig:
    """ARC sealing of relayed mail (gateway.message.arc, RFC 8617); off while ``domain`` is empty."""

    domain: str = ""
    selector: str = ""
    key_file: Path = Path("var/arc.key")
    seal: Literal["changed", "always"] = "changed"

    def validate(self, file, prefix):
        from gateway.message.address import valid_domain

        if not self.domain and not self.selector:
            return
        if not valid_domain(self.domain.lower()):
            raise ConfigError(file, f"{prefix}.domain", f"{self.domain!r}: expected the domain "
                              "whose DNS publishes the key (d= of the seal)")
        if not self.selector or not all(label and label.replace("-", "").replace("_", "")
                                         .isalnum() and label.isascii()
                                         for label in self.selector.split(".")):
            raise ConfigError(file, f"{prefix}.selector", f"{self.selector!r}: expected a "
                              "selector such as \"arc2026\" (s= of the seal)")


@dataclass(frozen=True)
class QuarantineConfig:
    dir: Path = Path("var/quarantine")


@dataclass(frozen=True)
class FlagsConfig:
    """Recipient flags and preferences (gateway.policy.flags; policy IV.C.1.b, IV.C.4.a-b)."""

    key_file: Path = Path("var/flags.key")
    subaddress_separator: str = "+"
    unsubscribe_base_url: str = ""
    unsubscribe_scope: Literal["sender", "organization", "global"] = "sender"
    unsubscribe_days: int = 60
    forward_timeout: float = 10.0
    forward_ca_file: Path | None = None
    uniform_replies: bool = False

    def validate(self, file, prefix):
        if len(self.subaddress_separator) > 1 or self.subaddress_separator.isalnum() \
                or self.subaddress_separator in ("@", '"', "."):
            raise ConfigError(file, f"{prefix}.subaddress_separator",
                              "one punctuation character such as \"+\", or \"\" for none")
        if self.unsubscribe_base_url:
            parts = urlsplit(self.unsubscribe_base_url)
            if (parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment
                    or any(c.isspace() for c in self.unsubscribe_base_url)):
                raise ConfigError(file, f"{prefix}.unsubscribe_base_url",
                                  f"{self.unsubscribe_base_url!r}: expected https://host[/path] "
                                  "(RFC 8058 one-click links are https)")
        if self.unsubscribe_days < 1:
            raise ConfigError(file, f"{prefix}.unsubscribe_days", "must be at least 1")
        if self.forward_timeout <= 0:
            raise ConfigError(file, f"{prefix}.forward_timeout", "must be positive")


@dataclass(frozen=True)
class TraceConfig:
    """Decisions kept in the state store for `gateway trace` (gateway.ops.trace)."""

    days: int = 14

    def validate(self, file, prefix):
        if not 0 <= self.days <= 366:
            raise ConfigError(file, f"{prefix}.days", "must be 0 (no trace) to 366")


@dataclass(frozen=True)
class CheckSettings:
    mode: Mode = "enforce"


@dataclass(frozen=True)
class Config:
    file: Path
    server: ServerConfig = ServerConfig()
    milter: MilterConfig = MilterConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    state: StateConfig = StateConfig()
    university: UniversityConfig = UniversityConfig()
    senders: SendersConfig = SendersConfig()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()
    limits: LimitsConfig = LimitsConfig()
    dns: DnsConfig = DnsConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    flags: FlagsConfig = FlagsConfig()
    arc: ArcConfig = ArcConfig()
    business_hours: BusinessHoursConfig = BusinessHoursConfig()
    trace: TraceConfig = TraceConfig()
    checks: dict[str, CheckSettings] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def path(self, p: Path | str) -> Path:
        """A configured path, made absolute relative to the configuration file."""
        p = Path(p)
        return p if p.is_absolute() else self.base_dir / p

    def check_settings(self, check: str) -> CheckSettings:
        """The global ``[checks.NAME]`` settings, or the check's defaults."""
        if check in self.checks:
            return self.checks[check]
        from gateway.checks import CHECK_SETTINGS

        return CHECK_SETTINGS[check]()


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("file", "checks")}


def parse_checks(table, file, prefix: str,
                 base: dict[str, CheckSettings] | None = None) -> dict[str, CheckSettings]:
    """``[checks.NAME]`` tables, each naming a known check, into that check's Settings.

    With ``base`` (a sender's file over the global settings) only the keys given change.
    """
    from gateway.checks import CHECK_SETTINGS

    if not isinstance(table, dict):
        raise ConfigError(file, prefix, "expected a table of [checks.NAME] tables")
    out = {}
    for name, value in table.items():
        if name not in CHECK_SETTINGS:
            raise ConfigError(file, f"{prefix}.{name}", "unknown check (known checks: "
                              f"{', '.join(sorted(CHECK_SETTINGS))})")
        if not isinstance(value, dict):
            raise ConfigError(file, f"{prefix}.{name}", "expected a table, e.g. mode = \"monitor\"")
        settings = build(CHECK_SETTINGS[name], value, file, f"{prefix}.{name}")
        if base is not None and name in base:
            settings = dataclasses.replace(base[name], **{k: getattr(settings, k) for k in value})
        out[name] = settings
    return out


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    data = read_toml(path)
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    values = {}
    for key, value in data.items():
        if key == "checks":
            values["checks"] = parse_checks(value, path, "checks")
        elif key in SECTIONS:
            cls = globals()[hints[key]] if isinstance(hints[key], str) else hints[key]
            if not isinstance(value, dict):
                raise ConfigError(path, key, f"expected a [{key}] table")
            values[key] = build(cls, value, path, key)
        else:
            raise ConfigError(path, key, "unknown section (known sections: "
                              + ", ".join(sorted([*SECTIONS, "checks"])) + ")")
    config = Config(file=path, **values)
    if not config.server.listen and not config.milter.listen:
        raise ConfigError(path, "server.listen", "needs at least one host:port (or [milter] "
                          "listen for a milter-only gateway)")
    return config
