"""The message's DKIM signatures verified once per transaction, for every check that needs them.

``sender_auth`` (is there a passing, aligned signature?) and ``unsubscribe`` (RFC 8058 section 4:
is List-Unsubscribe covered by a *valid* signature?) both need the verification results. The
first of them to run verifies (``unsubscribe`` runs first, and only when a signature's ``h=``
covers the unsubscribe fields); the other reuses ``ctx.dkim``. The verification options
(minimum RSA size, ``l=``, number of signatures, clock skew) are always those of
``[checks.sender_auth]`` (the sender's own when set), whatever that check's mode, so both checks
judge a signature the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.checks.auth_dkim import DkimOptions, DkimResult, DkimVerifier

if TYPE_CHECKING:
    from gateway.checks.base import Context, Deps


def dkim_options(ctx: Context, deps: Deps) -> DkimOptions:
    """The DKIM options of ``[checks.sender_auth]`` for this transaction's sender."""
    if ctx.sender is not None and "sender_auth" in ctx.sender.checks:
        s = ctx.sender.checks["sender_auth"]
    else:
        s = deps.config.check_settings("sender_auth")
    return DkimOptions(now=deps.clock.now().timestamp(), min_rsa_bits=s.min_rsa_bits,
                       allow_body_length=s.allow_body_length, max_signatures=s.max_signatures,
                       clock_skew=s.clock_skew)


async def verified(ctx: Context, deps: Deps, verifier: DkimVerifier) -> list[DkimResult]:
    """``ctx.dkim``, verifying ``ctx.raw`` first when no check has yet."""
    if ctx.dkim is None:
        results = await verifier.verify(ctx.raw, dkim_options(ctx, deps), ctx.header_fields)
        if ctx.dkim is None:
            ctx.dkim = results
    return ctx.dkim
