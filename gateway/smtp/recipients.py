"""When two RCPT commands name the same mailbox (issue #10 item 4).

A repeated recipient is answered ``250 2.1.5`` and otherwise ignored: not forwarded to campus
mail again, not counted again against ``[server] max_recipients``, rate or audience limits.
"Same" follows RFC 5321: the domain is compared without case (2.4), the local part exactly
(it "MUST BE treated as case sensitive"), except that a quoted local part is the same as its
unquoted form when it needs no quoting (4.1.2: ``"alice"@x`` is ``alice@x``), and a quoted
pair ``\\c`` is the character ``c``.
"""

from __future__ import annotations

import re

from gateway.message.address import _DOT_ATOM, AddressError, Mailbox, parse_mailbox
from gateway.message.replies import Reply

DUPLICATE = Reply(250, "2.1.5", "Duplicate recipient; already accepted")

_QUOTED_PAIR = re.compile(r"\\(.)")


def mailbox_key(mailbox: Mailbox) -> str:
    """The comparison key of a parsed mailbox (its domain is already lower-cased)."""
    local = mailbox.local
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = '"' + _QUOTED_PAIR.sub(r"\1", local[1:-1]) + '"'
        inner = local[1:-1]
        if _DOT_ATOM.match(inner):  # the unquoted form, when it has one
            local = inner
    return f"{local}@{mailbox.domain}"


def path_key(path: str) -> str | None:
    """The comparison key of a RCPT path's content; None when it is not a mailbox (such a
    recipient is refused, never accepted, so it has no duplicates)."""
    try:
        return mailbox_key(parse_mailbox(path))
    except AddressError:
        return None
