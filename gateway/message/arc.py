"""ARC sealing (RFC 8617): the gateway's own ARC set on the messages it relays, so that campus
mail can still trust the gateway's Authentication-Results after the gateway's own changes broke
the vendor's DKIM signature.

With ``[arc] domain``, ``selector`` and ``key_file`` set, the gateway seals a relayed message
when ``seal = "changed"`` (the default) and the gateway changed a message the vendor signed
(DKIM-Signature or an ARC set in the message as received, and header fields removed or replaced:
the one-click unsubscribe rewrite, forged Authentication-Results), or always with
``seal = "always"``. The seal is computed over exactly the bytes relayed, after every header the
gateway adds or removes, and its three fields (ARC-Seal, ARC-Message-Signature,
ARC-Authentication-Results) are put on top: by the SMTP front itself, or, behind an MTA (the
milter front), as the first of the header fields the gateway asks the MTA to insert (below the
MTA's own Received field, which the seal does not cover).

Existing ARC sets are kept and chained: the incoming chain is verified (dkimpy's ARC verifier,
keys fetched through the gateway's resolver and cache) and its status goes into an
``Authentication-Results: <hostname>; arc=<pass|fail|none>`` field added for the seal, which
dkimpy's ``arc_sign`` reads as the new set's ``cv=``. A broken or out-of-order chain, one whose
latest seal already says ``cv=fail``, or one whose keys cannot be fetched now, gives ``cv=fail``;
the message is relayed all the same (ARC informs campus mail, it refuses nothing here). A chain
already at the RFC's 50 sets is relayed unsealed. dkimpy signs with its own pure-Python RSA:
two RSA-2048 signatures take ~55 ms of CPU whatever the message size (``bench/arc_bench.py``),
so the seal is always computed in a worker thread (the incoming chain is verified in the
resolver's pool); each ``pow()`` still holds the GIL for ~11 ms, which bounds how long the event
loop can wait behind it.

``gateway arc keygen`` writes a new RSA-2048 key to ``key_file`` (mode 0600; an existing file is
kept unless ``--force``) and prints the DNS TXT record to publish at
``<selector>._domainkey.<domain>``.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import TYPE_CHECKING

import dkim
import structlog
from dkim.crypto import parse_pem_private_key

from gateway.infra.dns import DnsNameError, DnsTempError
from gateway.message.headers import HeaderError, split

if TYPE_CHECKING:
    from gateway.checks.base import Context
    from gateway.infra.clock import Clock
    from gateway.infra.config import Config
    from gateway.infra.dns import Resolver
    from gateway.engine import Result
    from gateway.ops.metrics import Metrics

log = structlog.get_logger("gateway.message.arc")

INSTANCE_LIMIT = 50  # RFC 8617 4.2.1
# The header fields the ARC-Message-Signature covers, when present (From: always).
SIGNED = ("from", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
          "content-type", "content-transfer-encoding", "list-id", "list-unsubscribe",
          "list-unsubscribe-post", "feedback-id")


class ArcKeyError(ValueError):
    """The [arc] key_file cannot be used."""


def _names(raw: bytes) -> set[str]:
    """The lower-cased field names of the message's header block, as the canonical split
    (gateway.message.headers) sees them."""
    try:
        return {f.name.lower() for f in split(raw).fields}
    except HeaderError:  # (not reached: only an admitted message is relayed)
        return set()


def vendor_signed(raw: bytes) -> bool:
    """The message as received carries a DKIM signature or an ARC set."""
    return bool(_names(raw) & {"dkim-signature", "arc-seal"})


def load_key(path: Path) -> bytes:
    """The PEM private key of ``path``, checked to be an RSA key dkimpy can sign with."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ArcKeyError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parse_pem_private_key(pem)
    except Exception as exc:  # dkimpy's UnparsableKeyError, ASN.1 errors
        raise ArcKeyError(f"{path}: not an RSA private key in PEM form ({exc})") from None
    return pem


def generate_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, base64 SubjectPublicKeyInfo for the DNS record's p=)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def dns_record(selector: str, domain: str, public: str) -> str:
    """The zone-file line that publishes the key, its value split in 255-octet strings."""
    value = f"v=DKIM1; k=rsa; p={public}"
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def _chain(lookup, raw: bytes) -> tuple[str, str]:
    """The incoming chain's validation status (``none``, ``pass`` or ``fail``) and why; runs in
    the resolver's pool (``lookup`` resolves through the gateway's cache)."""

    def dnsfunc(name, timeout=5):
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        try:
            records = lookup(text.rstrip("."), "TXT").txt()
        except DnsNameError:
            return None
        return records[0] if records else None

    try:
        cv, _results, reason = dkim.ARC(raw, minkey=1024).verify(dnsfunc=dnsfunc)
    except DnsTempError as exc:
        return "fail", f"key look-up failed: {exc}"
    except Exception as exc:  # dkimpy's DKIMException and odd input
        return "fail", str(exc)
    if cv is None:  # an earlier seal already said cv=fail: the chain stays failed
        return "fail", reason
    return cv.decode(), reason


class ArcSealer:
    """Built once at start when ``[arc] domain`` is set (the key is read then)."""

    def __init__(self, config: Config, resolver: Resolver, clock: Clock,
                 metrics: Metrics | None = None) -> None:
        cfg = config.arc
        self.domain = cfg.domain.encode()
        self.selector = cfg.selector.encode()
        self.always = cfg.seal == "always"
        self.key = load_key(config.path(cfg.key_file))
        self.hostname = config.server.hostname
        self.resolver = resolver
        self.clock = clock
        self.metrics = metrics

    def wanted(self, received: bytes, relayed_content: bytes) -> bool:
        """Seal this message? ``received``: as the client sent it (``Result.received``, forged
        Authentication-Results still in); ``relayed_content``: the same after the gateway
        removed header fields (its added ones not included)."""
        return self.always or (relayed_content != received and vendor_signed(received))

    async def seal(self, received: bytes, relayed: bytes, sender: str = "unknown") -> bytes:
        """``relayed`` (every byte that goes to campus mail) with the gateway's ARC set on top;
        unchanged when it cannot be sealed (logged)."""
        fields = await self.fields(received, relayed, sender)
        return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + relayed

    async def fields(self, received: bytes, relayed: bytes, sender: str = "unknown"
                     ) -> list[tuple[str, str]]:
        """The header fields that go on top of ``relayed``, in order: the ARC set, then the
        Authentication-Results field that carries the incoming chain's status (values folded
        with CRLF, as signed); [] when the message cannot be sealed (logged). For a front that
        adds header fields rather than writing the bytes (the milter)."""
        cv, why = "none", ""
        if "arc-seal" in _names(received):
            cv, why = await self.resolver.in_thread(_chain, received)  # (a worker thread)
        ar = f"Authentication-Results: {self.hostname}; arc={cv}\r\n".encode()
        try:
            # two RSA-2048 signatures in dkimpy's pure-Python RSA: ~15 ms of CPU whatever the
            # size (bench/arc_bench.py), so always off the event loop
            signed = await asyncio.to_thread(self._sign, ar + relayed)
        except Exception as exc:  # dkimpy ParameterError (instance limit), key trouble
            log.warning("arc_seal_failed", error=str(exc)[:200], sender=sender)
            return []
        if not signed:
            log.warning("arc_seal_failed", error="dkimpy produced no ARC set", sender=sender)
            return []
        if cv == "fail":
            log.info("arc_chain_failed", reason=str(why)[:200], sender=sender)
        if self.metrics is not None:
            self.metrics.auth_results.labels("arc", cv, sender).inc()
        out = []
        for field in [*signed, ar]:  # b"Name: value\r\n" (folded with CRLF SP)
            name, _, value = field.decode("ascii").partition(": ")
            out.append((name, value.removesuffix("\r\n")))
        return out

    async def seal_result(self, ctx: Context, result: Result) -> None:
        """For a front whose MTA writes the message (the milter): when wanted, the seal's
        fields go first among the header fields the gateway adds (``result.headers``, inserted
        at the top), computed over those added fields and the message as the MTA keeps it."""
        if not self.wanted(result.received, result.content):
            return
        added = b"".join(f"{name}: {value}\r\n".encode() for name, value in result.headers)
        sender = ctx.sender.id if ctx.sender is not None else "unknown"
        result.headers[:0] = await self.fields(result.received, added + result.content, sender)

    def _sign(self, message: bytes) -> list[bytes]:
        present = _names(message)
        include = [h.encode() for h in SIGNED if h in present or h == "from"]
        return dkim.arc_sign(message, self.selector, self.domain, self.key,
                             self.hostname.encode(), include_headers=include,
                             timestamp=int(self.clock.now().timestamp()))
