"""Policy IV.B.3.c.ii: the return-path carries the sender's unique identifier."""

from __future__ import annotations

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject


class ReturnPath(Check):
    name = "return_path"
    stage = Stage.MAIL
    description = "MAIL FROM matches one of the sender's return_path patterns"

    async def check(self, ctx: Context) -> Verdict:
        expected = ", ".join(p for s in ctx.candidates for p in s.return_path) or "a registered one"
        if ctx.mail_from == "":
            return reject(550, "5.7.1", "Null reverse-path <> is not accepted; use the registered "
                          f"return-path ({expected})", "null_return_path")
        if ctx.sender is not None and ctx.sender.matches_return_path(ctx.mail_from):
            return ACCEPT
        return reject(550, "5.7.1", f"Return-path <{ctx.mail_from}> does not carry a registered "
                      f"sender identifier; expected {expected}", "return_path_mismatch")
