"""Policy checks, one module per control, run in the order listed here (the chain as data)."""

from gateway.checks.base import ACCEPT, Check, Context, Deps, Stage, Verdict, defer, reject
from gateway.checks.identity import Identity
from gateway.checks.registration import Registration
from gateway.checks.return_path import ReturnPath

CHECKS: tuple[type[Check], ...] = (Identity, Registration, ReturnPath)
CHECK_SETTINGS = {c.name: c.Settings for c in CHECKS}

__all__ = ["ACCEPT", "CHECKS", "CHECK_SETTINGS", "Check", "Context", "Deps", "Stage", "Verdict",
           "defer", "reject"]
