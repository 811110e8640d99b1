"""Queue ids: 16 characters of RFC 4648's base32hex (``0-9A-V``, which sorts as the numbers it
encodes): 80 bits, the first 45 the milliseconds since 1970 (enough until the year 3084), the
last 35 random (from ``secrets``).

They sort by the time of their MAIL, as Postfix's long queue ids do, so a store keyed by them
(the trace: gateway.ops.trace) appends its records at the end of its index instead of writing
a page anywhere in it for each. Two ids collide only within one millisecond, once in 34
billion pairs: at 400 messages a second kept 14 days, about once in 300 such retention periods
(48 random bits collided hundreds of times in one).
"""

from __future__ import annotations

import base64
import secrets

LENGTH = 16
_RANDOM_BITS = 35


def queue_id(unix_ms: int) -> str:
    """A new queue id for a transaction whose MAIL came at ``unix_ms`` (milliseconds)."""
    n = (unix_ms % (1 << 45)) << _RANDOM_BITS | secrets.randbits(_RANDOM_BITS)
    return base64.b32hexencode(n.to_bytes(10, "big")).decode("ascii")
