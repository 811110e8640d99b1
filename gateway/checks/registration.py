"""Policy IV.B.3 (exception process): an exception is granted for a period; after it, no mail."""

from __future__ import annotations

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject


class Registration(Check):
    name = "registration"
    stage = Stage.MAIL
    description = "the sender's policy exception has not expired"

    async def check(self, ctx: Context) -> Verdict:
        sender = ctx.sender
        if sender is None:
            return ACCEPT
        if sender.expired(self.deps.clock.now().date()):
            return reject(550, "5.7.1", f"Registration of sender {sender.id} expired on "
                          f"{sender.expires.isoformat()}; renew the policy exception",
                          "registration_expired")
        return ACCEPT
