"""Reload: re-read gateway.toml and the sender files while the gateway runs.

The new configuration and registry are read and validated whole, then the checks are built from
them; only when all of that succeeded does the engine switch to the new
:class:`~gateway.engine.generation.Generation`, in one assignment on the event loop. A transaction
keeps the generation it began with (``Transaction.gen``), so a message in flight is decided
under the registry its MAIL FROM was accepted under; the next MAIL uses the new one. Sessions are
never dropped.

Keys the running process cannot change in place (listeners, the upstream pool, the state store,
the admin listener, logging, DNS, quarantine, flags keys) keep their running values; a reload that
changes them applies the rest and names them as needing a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.infra.config import Config, load_config
from gateway.policy.senders import Registry, load_registry
from gateway.infra.typed import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

# Dotted keys (a section, or section.key) whose change needs a restart: the running process holds
# sockets, pools, stores, keys or threads built from them at start.
RESTART_KEYS = (
    "server.listen", "server.tls_cert", "server.tls_key", "server.require_tls", "milter", "arc",
    "upstream", "state", "admin", "logging", "dns", "quarantine", "flags", "trace",
    "limits.sessions_total", "limits.sessions_per_ip", "limits.sessions_per_sender",
    "limits.connection_rate", "limits.auth_failures_per_session",
    "limits.auth_lockout", "limits.auth_window", "limits.auth_delay", "limits.auth_max_delay",
    "limits.auth_concurrency",
    "limits.throttle_refresh", "limits.adaptive", "limits.adaptive_floor",
    "limits.adaptive_decrease", "limits.adaptive_increase", "limits.adaptive_interval",
    "limits.adaptive_latency",
)


def _sections(config: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in ("file", "checks")]


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ (``checks.NAME`` for a check's settings)."""
    out = []
    for section in _sections(old):
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                out.append(f"{section}.{f.name}")
    for name in sorted(set(old.checks) | set(new.checks)):
        if old.check_settings(name) != new.check_settings(name):
            out.append(f"checks.{name}")
    return out


def needs_restart(key: str, old: Config) -> bool:
    if key == "limits.global_rate":  # the adaptive rate was built from it
        return old.limits.adaptive
    return any(key == k or key.startswith(k + ".") for k in RESTART_KEYS)


def effective(old: Config, new: Config, restart: list[str]) -> Config:
    """``new`` with the keys in ``restart`` kept at their running (``old``) values."""
    sections: dict[str, dict[str, object]] = {}
    for key in restart:
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = getattr(getattr(old, section), name)
    return dataclasses.replace(new, **{
        section: dataclasses.replace(getattr(new, section), **values)
        for section, values in sections.items()})


@dataclass
class SenderChanges:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, old: Registry, new: Registry) -> SenderChanges:
        out = cls(added=sorted(set(new.by_id) - set(old.by_id)),
                  removed=sorted(set(old.by_id) - set(new.by_id)))
        for sid in sorted(set(old.by_id) & set(new.by_id)):
            a, b = old.by_id[sid], new.by_id[sid]
            if a != b or a.checks != b.checks:
                out.changed.append(sid)
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ReloadResult:
    """What a reload did. ``error`` set: refused whole, nothing changed."""

    applied: bool
    generation: int
    changed: list[str] = field(default_factory=list)  # applied configuration keys
    restart_needed: list[str] = field(default_factory=list)
    senders: SenderChanges = field(default_factory=SenderChanges)
    error: ConfigError | None = None

    def to_json(self) -> dict:
        out = {"applied": self.applied, "generation": self.generation, "changed": self.changed,
               "restart_needed": self.restart_needed, "senders": self.senders.to_json()}
        if self.error is not None:
            out["error"] = {"file": self.error.file, "key": self.error.key,
                            "reason": self.error.reason, "message": str(self.error)}
        return out


def read(path) -> tuple[Config, Registry]:
    """gateway.toml and the sender files, validated together (blocking file reads)."""
    config = load_config(path)
    return config, load_registry(config.path(config.senders.dir), config.checks,
                                 config.limits.ceiling)


class Reloader:
    """Serializes reloads of one gateway; each is all or nothing."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.lock = asyncio.Lock()

    async def reload(self, actor: str) -> ReloadResult:
        gw = self.gateway
        async with self.lock:
            running = gw.config
            current = gw.engine.generation
            try:
                new, registry = await asyncio.to_thread(read, running.file)
                keys = changed_keys(running, new)
                restart = [k for k in keys if needs_restart(k, running)]
                config = effective(running, new, restart)
                generation = gw.build_generation(config, registry, current.number + 1,
                                                 previous=current)
            except ConfigError as exc:
                result = ReloadResult(False, current.number, error=exc)
            else:
                senders = SenderChanges.between(current.registry, registry)
                gw.switch(generation)  # from here new transactions use it
                result = ReloadResult(True, generation.number,
                                      [k for k in keys if k not in restart], restart, senders)
            gw.reloaded(result, actor)
            return result
