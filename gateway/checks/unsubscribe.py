"""Policy IV.C.1.a: only transactional mail may be sent without an unsubscribe link.

Every message whose class (the ``message_class`` check) is not transactional must carry
``List-Unsubscribe`` (RFC 2369) with at least one ``https:`` or ``mailto:`` URI. With an
``https:`` URI it must also carry ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
(RFC 8058 one-click unsubscribe). When the message is DKIM-signed, a *valid* signature must cover
these headers (RFC 8058 section 4): one that verifies (``pass``), whose ``d=`` is one of the
sender's registered domains, and whose ``h=`` tag lists List-Unsubscribe, and
List-Unsubscribe-Post when present. A signature that fails, or signs for another domain, does not
count, whatever its ``h=`` says.

The signatures are verified once per message (gateway.checks.dkim_once): the check's first half
(:class:`Unsubscribe`, with the cheap header checks) refuses a message none of whose signatures
lists the fields in ``h=``, without a DNS query; its second half (:class:`UnsubscribeCoverage`,
same name, mode and settings) runs after ``sender_auth`` and reuses the results it verified, so
that a message whose signatures fail is first told that its authentication failed. The
verification uses ``[checks.sender_auth]``'s DKIM options whatever that check's mode, so with
``sender_auth`` off or in monitor mode the coverage is still judged by verified signatures.
A covering signature whose key cannot be fetched for now defers (451 4.7.5) rather than refuse
mail that may be fine; without a resolver at all the check defers with 451 4.3.0.

Anything missing or malformed is refused with 550 5.7.1 naming what is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

from gateway.checks.auth_alignment import registered
from gateway.checks.auth_dkim import DkimResult, DkimVerifier
from gateway.checks.base import ACCEPT, Check, Context, Deps, Stage, Verdict, defer, reject
from gateway.checks.dkim_once import verified
from gateway.checks.message_class import message_class_of
from gateway.infra.config import CheckSettings

ONE_CLICK = "List-Unsubscribe=One-Click"
_COMMENT = re.compile(r"\([^()]*\)")
_BRACKETED = re.compile(r"<([^<>]*)>")
_SEPARATORS = re.compile(r"[\s,]*")
_BAD_URI_CHARS = re.compile(r"[\x00-\x20\x7f-\uffff<>\"\\^`{|}]")
_POLICY = "policy IV.C.1.a"


@dataclass(frozen=True)
class UnsubscribeSettings(CheckSettings):
    # With an https: URI in List-Unsubscribe, also require
    # "List-Unsubscribe-Post: List-Unsubscribe=One-Click" (RFC 8058).
    require_one_click: bool = True
    # When the message has DKIM-Signature headers, require one whose h= tag lists
    # List-Unsubscribe (and List-Unsubscribe-Post when present).
    require_signed: bool = True


def _fail(text: str, reason: str) -> Verdict:
    return reject(550, "5.7.1", text, reason)


def parse_list_unsubscribe(value: str) -> list[str] | None:
    """The URIs of an RFC 2369 List-Unsubscribe value, or None when it is not a list of
    ``<URI>`` items separated by commas (comments in parentheses and whitespace allowed)."""
    text = value.replace("\r", "").replace("\n", "")
    if "(" in text:
        text = _COMMENT.sub(" ", text)
    uris = []
    pos = 0
    for m in _BRACKETED.finditer(text):
        if not _SEPARATORS.fullmatch(text, pos, m.start()):
            return None
        # RFC 2369: internal whitespace is ignored (str.split's white space is \s's)
        uris.append("".join(m.group(1).split()))
        pos = m.end()
    if not uris or not _SEPARATORS.fullmatch(text, pos):
        return None
    return uris


def usable_uri(uri: str) -> str | None:
    """``"https"`` or ``"mailto"`` when ``uri`` is a well-formed URI of that scheme, else None."""
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.lower()
    if not colon or not rest or _BAD_URI_CHARS.search(uri):
        return None
    if scheme == "https":
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            return None
        return "https" if parts.hostname else None
    if scheme == "mailto":
        address = rest.partition("?")[0]
        local, at, domain = address.rpartition("@")
        return "mailto" if at and local and "." in domain else None
    return None


def dkim_signed_headers(value: str) -> set[str]:
    """The lower-cased header names in the ``h=`` tag of one DKIM-Signature value (white
    space anywhere in the tag ignored)."""
    for tag in value.split(";"):
        name, eq, tag_value = tag.partition("=")
        if eq and name.strip().lower() == "h":
            # str.split() splits at exactly the characters \s matches in a str pattern
            return {h.lower() for h in "".join(tag_value.split()).split(":") if h}
    return set()


def signed_sets(ctx: Context, message: Message) -> list[frozenset[str]]:
    """The ``h=`` sets of ``message``'s DKIM-Signature fields, in order: read once per
    message (``ctx.dkim_signed``) for both halves of the check."""
    memo = ctx.dkim_signed
    if memo is None or memo[0] is not message:
        memo = ctx.dkim_signed = (message, [frozenset(dkim_signed_headers(str(s)))
                                            for s in message.get_all("DKIM-Signature") or []])
    return memo[1]


class Unsubscribe(Check):
    name = "unsubscribe"
    stage = Stage.DATA
    description = "non-transactional mail carries List-Unsubscribe (https: one-click or mailto:)"
    Settings = UnsubscribeSettings

    async def check(self, ctx: Context) -> Verdict:
        message = ctx.message
        message_class = message_class_of(ctx, self.deps)
        if message_class == "transactional" or message is None:
            return ACCEPT
        settings = self.settings(ctx)
        why = f"{message_class} mail must be unsubscribable ({_POLICY}, RFC 2369, RFC 8058)"
        values = message.get_all("List-Unsubscribe") or []
        if not values:
            return _fail(f"List-Unsubscribe header is missing; {why}: add List-Unsubscribe with "
                         "an https: (one-click) or mailto: URI", "unsubscribe_missing")
        if len(values) > 1:
            return _fail(f"List-Unsubscribe appears {len(values)} times; give one header with "
                         "all URIs", "unsubscribe_malformed")
        uris = parse_list_unsubscribe(str(values[0]))
        if uris is None:
            return _fail("List-Unsubscribe is malformed: expected <https:...> and/or "
                         "<mailto:...> URIs in angle brackets, separated by commas",
                         "unsubscribe_malformed")
        schemes = {usable_uri(u) for u in uris} - {None}
        if not schemes:
            return _fail(f"List-Unsubscribe has no valid https: or mailto: URI; {why}",
                         "unsubscribe_no_uri")
        posts = message.get_all("List-Unsubscribe-Post") or []
        if "https" in schemes and settings.require_one_click and not posts:
            return _fail(f"List-Unsubscribe-Post: {ONE_CLICK} is missing; it is required with "
                         "an https: unsubscribe URI (RFC 8058 one-click)", "one_click_missing")
        if posts and (len(posts) > 1 or str(posts[0]).strip() != ONE_CLICK):
            return _fail(f"List-Unsubscribe-Post is malformed: expected exactly one header "
                         f"\"List-Unsubscribe-Post: {ONE_CLICK}\" (RFC 8058)",
                         "one_click_malformed")
        signatures = signed_sets(ctx, message) if settings.require_signed else []
        if signatures:
            needed = _needed(message)
            names = " and ".join(["List-Unsubscribe", "List-Unsubscribe-Post"][:len(needed)])
            if not any(needed <= signed for signed in signatures):
                return _fail(f"DKIM-Signature does not cover {names}: list "
                             f"{'them' if posts else 'it'} in the h= tag of the signature "
                             "(RFC 8058 section 4)", "unsubscribe_unsigned")
        return ACCEPT  # whether a covering signature is valid: UnsubscribeCoverage, later


def _needed(message: Message) -> frozenset[str]:
    posts = message.get_all("List-Unsubscribe-Post") or []
    return frozenset(["list-unsubscribe"] + (["list-unsubscribe-post"] if posts else []))


class UnsubscribeCoverage(Check):
    """The second half of ``unsubscribe`` (same name, mode and settings), run after
    ``sender_auth``: a signature whose ``h=`` covers the unsubscribe fields must be valid
    (RFC 8058 section 4). After ``sender_auth`` so that a message whose signatures fail is told
    about its authentication first, and so that the signatures it verified are reused."""

    name = "unsubscribe"
    stage = Stage.DATA
    description = Unsubscribe.description
    Settings = UnsubscribeSettings

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.verifier: DkimVerifier | None = None  # built at first use (needs the resolver)

    async def check(self, ctx: Context) -> Verdict:
        message = ctx.message
        if (message is None or message_class_of(ctx, self.deps) == "transactional"
                or not self.settings(ctx).require_signed):
            return ACCEPT
        needed = _needed(message)
        if not any(needed <= signed for signed in signed_sets(ctx, message)):
            return ACCEPT  # unsigned, or refused by the first half (unless it only monitors)
        names = " and ".join(["List-Unsubscribe", "List-Unsubscribe-Post"][:len(needed)])
        if self.deps.dns is None:
            return defer(451, "4.3.0", "DKIM signatures cannot be verified (no resolver); try "
                         "again later", "auth_unavailable")
        if self.verifier is None:
            self.verifier = DkimVerifier(self.deps.dns)
        results = await verified(ctx, self.deps, self.verifier)
        domains = ctx.sender.domains if ctx.sender is not None else ()
        covering = [r for r in results if needed <= r.signed]
        if any(r.result == "pass" and registered(r.domain, domains) for r in covering):
            return ACCEPT
        if any(r.result == "temperror" and registered(r.domain, domains) for r in covering):
            return defer(451, "4.7.5", f"The DKIM signature covering {names} could not be "
                         "verified for now (key look-up failed); try again later",
                         "unsubscribe_temperror")
        why = "; ".join(_why(r, domains) for r in covering) or "no verified signature covers them"
        return _fail(f"{names} must be covered by a valid DKIM signature of a registered domain "
                     f"(RFC 8058 section 4): {why}"[:900], "unsubscribe_unsigned")


def _why(r: DkimResult, domains: tuple[str, ...]) -> str:
    label = f"signature d={r.domain or '?'} s={r.selector or '?'}"
    if r.result != "pass":
        return f"{label} is {r.result}" + (f" ({r.reason})" if r.reason else "")
    return f"{label} passes but d= is not a registered domain of this sender"
