"""Policy checks, one module per control, run in the order listed here (the chain as data)."""

from gateway.checks.attachments import Attachments
from gateway.checks.base import ACCEPT, Check, Context, Deps, Stage, Verdict, defer, reject
from gateway.checks.display_name import DisplayName
from gateway.checks.identity import Identity
from gateway.checks.large_audience import LargeAudience
from gateway.checks.message_class import MessageClass
from gateway.checks.rate_limit import RateLimit, RateLimitAtMail
from gateway.checks.recipient_flags import RecipientFlags, RecipientFlagsAtRcpt
from gateway.checks.registration import Registration
from gateway.checks.return_path import ReturnPath
from gateway.checks.sender_auth import SenderAuth
from gateway.checks.unsubscribe import Unsubscribe, UnsubscribeCoverage

# Content controls (DATA): the From: display name (no parse needed), the class (unsubscribe and
# later controls key on it), then the cheap header checks, then the MIME walk.
CHECKS: tuple[type[Check], ...] = (Identity, Registration, ReturnPath,
                                   # a look at the rate budget: over it, 451 at MAIL already
                                   RateLimitAtMail,
                                   DisplayName, MessageClass, Unsubscribe, Attachments,
                                   SenderAuth,  # SPF/DKIM/alignment: DNS, after the cheap ones
                                   # RFC 8058 4: the covering signature is valid (reuses
                                   # sender_auth's verified signatures)
                                   UnsubscribeCoverage,
                                   LargeAudience,  # counts the audience; defers in business hours
                                   # flagged recipients (RCPT in reject mode; DATA): after every
                                   # refusal, so the vendor learns of those
                                   RecipientFlagsAtRcpt, RecipientFlags,
                                   # last: only a message about to be relayed spends budget (one
                                   # whose every recipient was dropped is not relayed)
                                   RateLimit)
CHECK_SETTINGS = {c.name: c.Settings for c in CHECKS}

__all__ = ["ACCEPT", "CHECKS", "CHECK_SETTINGS", "Check", "Context", "Deps", "Stage", "Verdict",
           "defer", "reject"]
