"""One-click unsubscribe links through the gateway (RFC 8058), so that opt-outs are recorded for
the system of record (policy IV.B.3, exception process item 8; IV.C.4.b and IV.C.5.b: preferences
honoured) as well as reaching the vendor.

With ``[flags] unsubscribe_base_url`` set, a relayed message with exactly one recipient whose
``List-Unsubscribe`` offers an https URI with ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
gets that https URI replaced by ``BASE/u/TOKEN`` (its mailto: URIs are kept as they are). A
one-click POST there records the opt-out (gateway.ops.unsubscribe_endpoint), then is forwarded to the
vendor's original URI.

The token is sealed, not merely signed: XSalsa20-Poly1305 (PyNaCl's SecretBox, with a key derived
from ``[flags] key_file``) over the expiry, the sender id, the recipient and the original URI.
Its Poly1305 tag is what makes it unforgeable (a changed or made-up token does not open, so the
endpoint cannot be used to opt out an arbitrary address); the encryption keeps the recipient's
address out of URLs, proxies and access logs. It expires after ``unsubscribe_days``.

Only single-recipient messages are rewritten: the relayed message is one copy for all its
recipients, and a link carrying one recipient must not reach another. Mail to several recipients
keeps the vendor's own link (the vendor still receives the opt-out; the gateway does not record
it). The rewrite changes List-Unsubscribe, which a vendor's DKIM signature covers (the unsubscribe
check requires it): after the rewrite that signature no longer verifies downstream, and campus
mail should rely on the gateway's Authentication-Results instead. Hence off by default.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.checks.unsubscribe import ONE_CLICK, parse_list_unsubscribe, usable_uri

if TYPE_CHECKING:
    from email.message import Message

    from gateway.policy.flags import FlagKeys

_MAX_HEADER = 900  # a rewritten field longer than this is left alone (RFC 5322: 998 per line)


@dataclass(frozen=True)
class Link:
    """What a token carries."""

    recipient: str
    sender: str
    uri: str  # the vendor's one-click https URI
    expires: int  # epoch seconds


class Expired(Exception):
    """The token is genuine but past its expiry."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSealer:
    def __init__(self, keys: FlagKeys, days: int) -> None:
        self._box = keys.box("unsubscribe-token")
        self.lifetime = dt.timedelta(days=days)

    def seal(self, link: Link) -> str:
        fields = (str(link.expires), link.sender, link.recipient, link.uri)
        return _b64(bytes(self._box.encrypt("\0".join(fields).encode())))

    def issue(self, recipient: str, sender: str, uri: str, now: dt.datetime) -> str:
        return self.seal(Link(recipient, sender, uri, int((now + self.lifetime).timestamp())))

    def open(self, token: str, now: dt.datetime) -> Link | None:
        """The link of a genuine token; None for a forged or damaged one. Raises Expired."""
        from nacl.exceptions import CryptoError

        try:
            plain = self._box.decrypt(_unb64(token)).decode()
            expires, sender, recipient, uri = plain.split("\0")
            link = Link(recipient, sender, uri, int(expires))
        except (CryptoError, ValueError, UnicodeDecodeError):
            return None
        if link.expires <= now.timestamp():
            raise Expired()
        return link


def rewritten(message: Message, token_url, recipients: list[str]
              ) -> tuple[tuple[str, str], ...] | None:
    """The List-Unsubscribe and List-Unsubscribe-Post fields that replace the message's own, or
    None when it is not to be rewritten. ``token_url(uri)`` gives the gateway's link for the
    vendor's https ``uri``."""
    if message is None or len(recipients) != 1:
        return None
    values = message.get_all("List-Unsubscribe") or []
    posts = message.get_all("List-Unsubscribe-Post") or []
    if len(values) != 1 or len(posts) != 1 or str(posts[0]).strip() != ONE_CLICK:
        return None
    uris = parse_list_unsubscribe(str(values[0]))
    if not uris:
        return None
    https = [u for u in uris if usable_uri(u) == "https"]
    if len(https) != 1:
        return None  # none: nothing to record; several: which one the client uses is unknown
    kept = [f"<{token_url(u)}>" if u == https[0] else f"<{u}>" for u in uris]
    value = ", ".join(kept)
    if len(value) > _MAX_HEADER:
        return None
    return (("List-Unsubscribe", value), ("List-Unsubscribe-Post", ONE_CLICK))


def is_list_unsubscribe(name: str, value: str) -> bool:
    """A strip_headers predicate for the fields :func:`rewritten` replaces."""
    return name.strip().lower() in ("list-unsubscribe", "list-unsubscribe-post")
