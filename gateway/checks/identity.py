"""Policy IV.B.3.c.i / IV.C.5.a: only registered senders, from their registered networks.

:func:`identify` gathers the facts (which registered senders the client could be); the
:class:`Identity` check judges them. Identification always runs, whatever the check's mode, so
that later checks know the sender.
"""

from __future__ import annotations

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject
from gateway.policy.senders import Registry


def identify(ctx: Context, registry: Registry) -> None:
    """Set ``ctx.candidates`` (senders the client may be) and ``ctx.sender`` (the one it is).

    An authenticated client is the sender it authenticated as, and is a candidate only when its
    IP is in that sender's networks. Otherwise the candidates are the senders whose networks hold
    the client IP, and the return-path picks among them (patterns never overlap).
    """
    if ctx.auth_user is not None:
        sender = registry.by_username[ctx.auth_user]
        ctx.sender = sender
        ctx.candidates = (sender,) if sender.has_ip(ctx.client_ip) else ()
        return
    candidates = registry.for_ip(ctx.client_ip)
    ctx.candidates = candidates
    matching = [s for s in candidates if ctx.mail_from and s.matches_return_path(ctx.mail_from)]
    if matching:
        ctx.sender = matching[0]
    else:
        ctx.sender = candidates[0] if len(candidates) == 1 else None


class Identity(Check):
    name = "identity"
    stage = Stage.MAIL
    description = "client IP (and AUTH identity) belongs to a registered sender"

    async def check(self, ctx: Context) -> Verdict:
        if ctx.candidates:
            return ACCEPT
        if ctx.auth_user is not None and ctx.sender is not None:
            return reject(550, "5.7.1", f"Client host [{ctx.client_ip}] is not in the registered "
                          f"networks of sender {ctx.sender.id}", "ip_not_in_sender_networks")
        return reject(550, "5.7.1", f"Client host [{ctx.client_ip}] is not a registered "
                      "sender; relaying denied", "unregistered_ip")
