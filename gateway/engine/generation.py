"""What transactions are decided under: the configuration, the sender registry and the checks
built from them. A reload (gateway.ops.reload) builds a new generation and the engine switches to it;
a transaction keeps the one it began with, so a message in flight finishes under the registry
its MAIL was accepted under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.message.address import DomainSet

if TYPE_CHECKING:
    from gateway.checks.pipeline import Pipeline
    from gateway.infra.config import Config
    from gateway.policy.senders import Registry


@dataclass(frozen=True)
class Generation:
    config: Config
    registry: Registry
    pipeline: Pipeline
    number: int = 0  # 0 at start, one more per applied reload
    university: DomainSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "university", DomainSet(self.config.university.domains))

    @property
    def hostname(self) -> str:
        return self.config.server.hostname
