"""DMARC (RFC 7489) for the Authentication-Results campus mail reads: the From: domain's
published policy, evaluated against the SPF and DKIM results ``sender_auth`` computed.

Policy discovery (6.6.3): the TXT records at ``_dmarc.<From: domain>``; those not starting with
``v=DMARC1`` are discarded; none left: the same at ``_dmarc.<organizational domain>`` (the Public
Suffix List the alignment check already uses); more than one left: no policy (result ``none``).
Every query goes through the gateway's resolver and cache (``[dns]``). A look-up that fails for
now (timeout, SERVFAIL) is ``temperror``; a record that is syntactically wrong (a tag twice, an
``adkim``/``aspf``/``pct`` value out of range, no valid ``p`` and no report address to fall back
on, non-ASCII, longer than :data:`MAX_RECORD` octets) is ``permerror``. A ``p`` (or ``sp``) that
is not valid where the record has a valid ``rua`` URI is read as ``p=none`` (6.6.3 step 6).

Evaluation (3.1, 6.6.2): ``pass`` when SPF passed for the MAIL FROM domain, or a DKIM signature
passed for its ``d=``, and that domain is aligned with the From: domain under the record's
``aspf`` / ``adkim`` (relaxed: the same organizational domain; strict: the same name).
Otherwise ``fail``, or ``temperror`` when an SPF or DKIM result that might have passed was a
temperror. The policy reported is ``p``, or ``sp`` (when given) for a From: domain below the
organizational domain whose record was found there. ``pct`` (6.6.4): a failing message outside
the sampled percentage gets the next milder policy (reject: quarantine; quarantine: none); the
sample is a hash of the message, so a retried message is sampled the same way.

Nothing here refuses mail: ``sender_auth`` records, logs and counts the result, and refuses only
for a sender whose ``[checks.sender_auth] dmarc = "pass"``.

Why not the ``dmarc`` or ``authheaders`` packages: both discover records with their own
dnspython resolver (``authheaders`` takes a look-up function but folds DNS failures into "no
record", so no ``temperror``), ``authheaders`` brings a second, different public suffix list
(``publicsuffix2``), and neither applies ``pct``. Discovery and the record grammar are ~150 lines
on top of the resolver and PSL the gateway already has.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.infra.dns import DnsNameError, DnsTempError

if TYPE_CHECKING:
    from gateway.checks.auth_alignment import Aligner
    from gateway.checks.auth_dkim import DkimResult
    from gateway.checks.auth_spf import SpfResult
    from gateway.infra.dns import Resolver

DmarcResultName = Literal["pass", "fail", "none", "temperror", "permerror"]
Disposition = Literal["none", "quarantine", "reject"]
MAX_RECORD = 2048  # octets; real records (a few report addresses) stay well under 500
_VERSION = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(;|\Z)", re.I)
_DISPOSITIONS = ("none", "quarantine", "reject")
_MILDER: dict[str, Disposition] = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_URI = re.compile(r"[a-z][a-z0-9+.-]*:[^\s,!]+(![0-9]+[kmgt]?)?\Z", re.I)


class RecordError(ValueError):
    """A DMARC record that is syntactically wrong (permerror)."""


@dataclass(frozen=True)
class Policy:
    """One parsed record, and where it was found."""

    domain: str  # the domain whose _dmarc name held it
    p: Disposition
    sp: Disposition | None = None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100


@dataclass(frozen=True)
class Discovery:
    """What policy discovery found for a From: domain."""

    outcome: Literal["found", "none", "temperror", "permerror"]
    policy: Policy | None = None
    reason: str = ""
    final: bool = True  # False: no record here, so the organizational domain is asked next


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcResultName
    domain: str  # the From: domain
    policy: Disposition | None = None  # what the domain asks for (p, or sp for a subdomain)
    disposition: Disposition | None = None  # the policy after pct sampling (fail only)
    pct: int = 100
    reason: str = ""


def parse_record(text: str, domain: str) -> Policy:
    """A ``v=DMARC1`` record's tags (RFC 7489 6.3, 6.4); RecordError when it is malformed."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip(" \t"):
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(" \t").lower(), value.strip(" \t")
        if not eq or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise RecordError(f"malformed tag {part.strip()[:40]!r}")
        if name in tags:
            raise RecordError(f"tag {name} appears twice")
        tags[name] = value
    has_rua = any(_URI.match(u.strip()) for u in tags.get("rua", "").split(",") if u.strip())
    p = tags.get("p", "").lower()
    if p not in _DISPOSITIONS:
        if not has_rua:
            raise RecordError("no valid p= tag" if not p else f"p={p[:20]} is not a policy")
        p = "none"  # 6.6.3 step 6: act as p=none for the reports' sake
    sp = tags.get("sp", "").lower() or None
    if sp is not None and sp not in _DISPOSITIONS:
        if not has_rua:
            raise RecordError(f"sp={sp[:20]} is not a policy")
        sp = "none"
    modes = {}
    for tag in ("adkim", "aspf"):
        value = tags.get(tag, "r").lower()
        if value not in ("r", "s"):
            raise RecordError(f"{tag}={value[:20]} is not r or s")
        modes[tag] = value
    pct_text = tags.get("pct", "100")
    if not re.fullmatch(r"[0-9]{1,3}", pct_text) or int(pct_text) > 100:
        raise RecordError(f"pct={pct_text[:20]} is not 0 to 100")
    return Policy(domain, p, sp, modes["adkim"], modes["aspf"], int(pct_text))  # type: ignore


async def _lookup(resolver: Resolver, domain: str) -> Discovery:
    """The DMARC record at ``_dmarc.<domain>``: found, none, temperror or permerror."""
    name = f"_dmarc.{domain}"
    try:
        records = await resolver.txt(name)
    except DnsTempError as exc:
        return Discovery("temperror", reason=f"DMARC record look-up failed: {exc}")
    except DnsNameError:
        return Discovery("none", reason=f"no DMARC record at {name}", final=False)
    texts = []
    for record in records:
        if not _VERSION.match(record.decode("latin-1")):
            continue  # not a DMARC record (6.6.3 step 3)
        texts.append(record)
    if not texts:
        return Discovery("none", reason=f"no DMARC record at {name}", final=False)
    if len(texts) > 1:
        return Discovery("none", reason=f"{len(texts)} DMARC records at {name}; none applies")
    record = texts[0]
    if len(record) > MAX_RECORD:
        return Discovery("permerror", reason=f"DMARC record at {name} is longer than "
                                             f"{MAX_RECORD} octets")
    try:
        text = record.decode("ascii")
        if any(not 0x20 <= ord(c) < 0x7f and c != "\t" for c in text):
            raise UnicodeDecodeError("ascii", record, 0, 1, "control character")
    except UnicodeDecodeError:
        return Discovery("permerror", reason=f"DMARC record at {name} is not printable ASCII")
    try:
        policy = parse_record(_VERSION.sub("", text, count=1), domain)
    except RecordError as exc:
        return Discovery("permerror", reason=f"malformed DMARC record at {name}: {exc}")
    return Discovery("found", policy)


async def discover(resolver: Resolver, domain: str, aligner: Aligner) -> Discovery:
    """Policy discovery for a From: domain (RFC 7489 6.6.3)."""
    found = await _lookup(resolver, domain)
    if found.final:  # found, an error, or several records (which ends discovery)
        return found
    org = aligner.organizational(domain)
    if org == domain:
        return found
    return await _lookup(resolver, org)


def sampled(raw: bytes, pct: int) -> bool:
    """Whether the policy applies to this message under ``pct`` (a stable hash of it)."""
    if pct >= 100:
        return True
    return int.from_bytes(hashlib.sha256(raw).digest()[:4], "big") % 100 < pct


def evaluate(found: Discovery, author: str, spf: SpfResult, dkim: Sequence[DkimResult],
             aligner: Aligner, raw: bytes) -> DmarcResult:
    """The DMARC result for the From: domain ``author``."""
    if found.outcome != "found":
        return DmarcResult(found.outcome, author, reason=found.reason)  # type: ignore[arg-type]
    policy = found.policy
    assert policy is not None
    asks: Disposition = policy.p
    if policy.domain != author and policy.sp is not None:
        asks = policy.sp
    mode = {"r": "relaxed", "s": "strict"}
    spf_ok = (spf.identity == "mailfrom" and spf.result == "pass"
              and aligner.aligned(spf.domain, author, mode[policy.aspf]))  # type: ignore
    dkim_ok = any(r.result == "pass" and aligner.aligned(r.domain, author, mode[policy.adkim])
                  for r in dkim)  # type: ignore
    if spf_ok or dkim_ok:
        return DmarcResult("pass", author, asks, pct=policy.pct)
    temp = spf.result == "temperror" or any(r.result == "temperror" for r in dkim)
    if temp:
        return DmarcResult("temperror", author, asks, pct=policy.pct,
                           reason="an SPF or DKIM result was a temporary error")
    applied = asks if sampled(raw, policy.pct) else _MILDER[asks]
    why = []
    if spf.result == "pass":
        why.append(f"SPF domain {spf.domain} not aligned ({mode[policy.aspf]})")
    passing = [r.domain for r in dkim if r.result == "pass"]
    if passing:
        why.append(f"DKIM d={','.join(passing)} not aligned ({mode[policy.adkim]})")
    return DmarcResult("fail", author, asks, applied, policy.pct,
                       "; ".join(why) or "no SPF or DKIM pass")
