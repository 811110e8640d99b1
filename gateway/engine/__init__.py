"""The one per-transaction engine both fronts drive.

A front (``gateway.smtp``: the gateway is an SMTP hop; ``gateway.milter``: Postfix asks it at each
stage) turns its protocol into calls on :class:`Engine` — ``mail``, ``rcpt``, ``content`` — and
the engine's answers back into its protocol: the SMTP front relays through ``gateway.relay``;
the milter front turns a :class:`Result` into milter actions. What a transaction is decided,
logged and counted is here, once; what a front adds is only how it talks.
"""

from gateway.engine.engine import Engine
from gateway.engine.transaction import Client, RcptDecision, Result, Transaction

__all__ = ["Client", "Engine", "RcptDecision", "Result", "Transaction"]
