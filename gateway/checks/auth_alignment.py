"""Policy IV.B.3.c.i and IV.B.3.c.iii (alignment): the author (From:) domain must be one of the
sender's registered domains, and an SPF or DKIM pass counts only for a registered domain that is
aligned with it, DMARC-style (RFC 7489 3.1): relaxed = same organizational domain, found with the
Public Suffix List (publicsuffixlist's bundled copy, no network), strict = the same domain.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from typing import Literal

from publicsuffixlist import PublicSuffixList

from gateway.message.address import plain_header_address, valid_domain

AlignmentMode = Literal["relaxed", "strict"]


class FromError(ValueError):
    """The From: header cannot name one author (RFC 5322 3.6.2 / RFC 7489 6.6.1)."""


def author_domain(message: Message | None) -> str:
    """The domain of the single From: address; FromError when there are several From: fields,
    several addresses, or none that has a valid domain."""
    fields = message.get_all("From", []) if message is not None else []
    if not fields:
        raise FromError("Message has no From: header")
    if len(fields) > 1:
        raise FromError(f"Message has {len(fields)} From: headers; exactly one is allowed")
    text = str(fields[0])
    plain = plain_header_address(text)  # the usual "Name <addr>": what getaddresses reads
    addresses = [plain] if plain is not None else [
        addr for _, addr in email.utils.getaddresses([text]) if addr]
    if len(addresses) != 1:
        raise FromError("From: must hold exactly one address"
                        + (f" (found {len(addresses)})" if addresses else ""))
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    try:  # (8-bit header bytes reach here as U+FFFD and fail: no SMTPUTF8 is offered)
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise FromError("From: address has an invalid domain") from None
    if not valid_domain(domain):
        raise FromError("From: address has no valid domain")
    return domain


def registered(domain: str, domains: tuple[str, ...]) -> bool:
    """``domain`` is one of the sender's registered domains, or a subdomain of one."""
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


class Aligner:
    """Organizational domains from the Public Suffix List; build once (the list takes ~50 ms)."""

    MEMO_MAX = 4096  # domains whose organizational domain is remembered (then forgotten at once)

    def __init__(self) -> None:
        self.psl = PublicSuffixList()
        # a message asks for the same few domains (author, SPF, DKIM d=) several times, and a
        # sender's messages for the same ones again: the list's walk is done once per domain
        self._memo: dict[str, str] = {}

    def organizational(self, domain: str) -> str:
        found = self._memo.get(domain)
        if found is None:
            if len(self._memo) >= self.MEMO_MAX:
                self._memo.clear()
            key = domain.lower().rstrip(".")
            found = self._memo[domain] = self.psl.privatesuffix(key) or key
        return found

    def aligned(self, identity: str, author: str, mode: AlignmentMode = "relaxed") -> bool:
        identity, author = identity.lower().rstrip("."), author.lower().rstrip(".")
        if not identity or not author:
            return False
        if mode == "strict":
            return identity == author
        return self.organizational(identity) == self.organizational(author)
