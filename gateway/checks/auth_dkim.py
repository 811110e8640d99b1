"""Policy IV.B.3.c.iii (DKIM half): every DKIM-Signature verified (RFC 6376) with dkimpy.

Key records come from the shared asynchronous resolver (never dkimpy's blocking look-up): the
signatures are parsed first, their keys fetched concurrently, then dkimpy's hash and signature
check runs with the fetched key (in a worker thread for large messages). RSA (RFC 8301: keys
shorter than the configured minimum, never under 1024 bits, fail; rsa-sha1 fails) and Ed25519
(RFC 8463) are supported. Time checks use the gateway's clock: an ``x=`` in the past fails. A
signature with ``l=`` covers only part of the body: its result is ``policy`` unless configured.
Results follow RFC 8601 2.7.1: pass, fail, neutral (malformed signature), policy, temperror
(key look-up failed for now), permerror (no usable key).
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import dkim
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, utils
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from cryptography.hazmat.primitives.hashes import SHA256
from dkim.canonicalization import correct_empty_body, strip_trailing_lines
from dkim.util import InvalidTagValueList, parse_tag_value
from nacl.exceptions import BadSignatureError

from gateway.checks.auth_spf import printable
from gateway.infra.dns import DnsNameError, DnsTempError

if TYPE_CHECKING:
    from gateway.infra.dns import Resolver

log = structlog.get_logger("gateway.auth")

DkimResultName = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror"]
_PKCS1, _PREHASHED_SHA256 = padding.PKCS1v15(), utils.Prehashed(SHA256())
INLINE_LIMIT = 256 * 1024  # larger messages are hashed in a worker thread
_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\Z")


@dataclass(frozen=True)
class DkimResult:
    result: DkimResultName
    domain: str = ""  # d=, lower-case
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    b: str = ""  # the first characters of b=, to tell signatures apart (RFC 6008)
    reason: str = ""
    key_bits: int = 0
    signed: frozenset[str] = frozenset()  # the lower-cased header names of h= (what it covers)


@dataclass(frozen=True)
class DkimOptions:
    now: float  # Unix time, from the gateway's clock
    min_rsa_bits: int = 1024
    allow_body_length: bool = False
    max_signatures: int = 5
    clock_skew: int = 300


class OpenSSLRSAKey:
    """An RSA public key verified through OpenSSL (the ``cryptography`` package) instead of
    dkimpy's pure-Python arithmetic, which cost about a tenth of a relayed message's CPU.

    dkimpy has no hook for its RSA verification, but it verifies an Ed25519 signature by calling
    ``pk.verify(digest, signature)`` on the key object it is given and reads PyNaCl's
    ``BadSignatureError`` as a signature that did not verify: an RSA key with that interface,
    handed to dkimpy under ``ktag = b"ed25519"``, has dkimpy canonicalize and hash the message
    (body hash, signed header fields) exactly as for RSA and check the digest here with
    RSASSA-PKCS1-v1_5, without forking dkimpy. The key size and type checks are ours
    (:func:`_verify`), made before, on the key as dkimpy parsed it."""

    def __init__(self, pk: dict) -> None:
        self.key = RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()

    def verify(self, digest: bytes, signature: bytes) -> None:
        try:
            self.key.verify(signature, digest, _PKCS1, _PREHASHED_SHA256)
        except (InvalidSignature, ValueError) as exc:
            raise BadSignatureError(str(exc)) from None


def _openssl_rsa(pk) -> OpenSSLRSAKey | None:
    try:
        return OpenSSLRSAKey(pk)
    except Exception:  # an odd key OpenSSL refuses: dkimpy's arithmetic judges it
        return None


@dataclass
class _Key:
    pk: object = None
    openssl: OpenSSLRSAKey | None = None  # RSA keys, for rsa-sha256
    bits: int = 0
    ktag: bytes = b""
    tlsrpt: bool = False
    tags: dict | None = None
    error: DkimResult | None = None


@dataclass
class _Sig:
    header: list  # [name, value] as dkimpy parsed it
    tags: dict
    domain: str
    selector: str
    algorithm: str
    b: str
    early: DkimResult | None = None  # decided without the key

    def result(self, result: DkimResultName, reason: str, bits: int = 0) -> DkimResult:
        signed = frozenset(h.strip().lower().decode("ascii", "replace")
                           for h in self.tags.get(b"h", b"").split(b":") if h.strip())
        return DkimResult(result, self.domain, self.selector, self.algorithm, self.b,
                          printable(reason), bits, signed)


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _split(raw: bytes, fields: tuple = ()) -> tuple[list, bytes]:
    """dkimpy's (headers, body) of the message. dkimpy's parser splits every line of the body
    to turn bare LFs into CRLFs; a message that has none (SMTP's own line ending throughout)
    needs only its header parsed, and its body is the bytes after the blank line. ``fields``:
    the header fields already split (gateway.message.headers), used as they are when they are
    exactly the message's header block."""
    if fields:
        head = b"".join(f.raw for f in fields)
        if raw.startswith(head) and raw[len(head):len(head) + 2] == b"\r\n":
            return [[f.name.encode("ascii"), f.value + b"\r\n"] for f in fields], \
                raw[len(head) + 2:]
    end = raw.find(b"\r\n\r\n")
    if end > 0 and raw.count(b"\n") == raw.count(b"\r\n"):  # (at 0: no header block at all)
        headers, _ = dkim.rfc822_parse(raw[:end + 4])
        return headers, raw[end + 4:]
    return dkim.rfc822_parse(raw)


def _prepare(raw: bytes, opts: DkimOptions, fields: tuple = ()
             ) -> tuple[dkim.DKIM | None, list[_Sig], str]:
    """Parse the message and its signatures; decide what can be decided without a key."""
    try:
        verifier = dkim.DKIM(None, minkey=0)
        verifier.headers, verifier.body = _split(raw, fields)
    except dkim.DKIMException as exc:
        return None, [], f"message could not be parsed for DKIM: {exc}"
    found = [h for h in verifier.headers if h[0].lower() == b"dkim-signature"]
    sigs = []
    for header in found[:opts.max_signatures]:
        try:
            tags = parse_tag_value(header[1])
        except InvalidTagValueList as exc:
            sig = _Sig(header, {}, "", "", "", "")
            sig.early = sig.result("neutral", f"malformed signature: {exc}")
            sigs.append(sig)
            continue
        domain = _text(tags.get(b"d", b"")).strip().lower().rstrip(".")
        sig = _Sig(header, tags, domain, _text(tags.get(b"s", b"")).strip().lower(),
                   _text(tags.get(b"a", b"")).strip().lower(),
                   re.sub(r"\s+", "", _text(tags.get(b"b", b"")))[:12])
        sig.early = _early(sig, opts)
        sigs.append(sig)
    return verifier, sigs, ""


def _early(sig: _Sig, opts: DkimOptions) -> DkimResult | None:
    tags = sig.tags
    try:
        # dkimpy's own t=/x= checks use the system clock; ours use the gateway's, below.
        dkim.validate_signature_fields({k: v for k, v in tags.items() if k not in (b"t", b"x")})
    except dkim.DKIMException as exc:
        return sig.result("neutral", f"malformed signature: {exc}")
    if not _DOMAIN.match(sig.domain) or "." not in sig.domain:
        return sig.result("neutral", "malformed signature: bad d= domain")
    if not _DOMAIN.match(sig.selector):
        return sig.result("neutral", "malformed signature: bad s= selector")
    headers = [h.strip().lower() for h in re.split(rb":", tags[b"h"])]
    if b"from" not in headers:
        return sig.result("permerror", "From: is not signed (h= lacks from)")
    for name in (b"t", b"x"):
        if name in tags and not re.fullmatch(rb"\d{1,12}", tags[name].strip()):
            return sig.result("neutral", f"malformed signature: {name.decode()}= is not a number")
    t = int(tags[b"t"]) if b"t" in tags else None
    x = int(tags[b"x"]) if b"x" in tags else None
    if x is not None and t is not None and x < t:
        return sig.result("neutral", "malformed signature: x= is before t=")
    if x is not None and x < opts.now - opts.clock_skew:
        return sig.result("fail", "signature expired (x= is in the past)")
    if t is not None and t > opts.now + opts.clock_skew:
        return sig.result("policy", "signature timestamp (t=) is in the future")
    if sig.algorithm == "rsa-sha1":
        return sig.result("fail", "rsa-sha1 signatures are not accepted (RFC 8301)")
    return None


def _parse_key(record: bytes | None, name: str) -> _Key:
    if record is None:
        return _Key(error=DkimResult("permerror", reason=f"no key record at {name}"))
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as exc:
        return _Key(error=DkimResult("permerror", reason=f"malformed key record: {exc}"))
    if not tags.get(b"p", b"").strip():
        return _Key(error=DkimResult("permerror", reason="key revoked (empty p=)"))
    try:
        pk, bits, ktag, tlsrpt = dkim.evaluate_pk(name.encode(), record)
    except Exception as exc:  # KeyFormatError, NaClNotFoundError, base64 errors
        return _Key(error=DkimResult("permerror", reason=f"unusable key: {exc}"))
    return _Key(pk, _openssl_rsa(pk) if ktag == b"rsa" else None, bits or 0, ktag or b"",
                bool(tlsrpt), tags)


def _verify(verifier: dkim.DKIM, sig: _Sig, key: _Key, opts: DkimOptions) -> DkimResult:
    if key.error is not None:
        return sig.result(key.error.result, key.error.reason)
    family = sig.algorithm.split("-", 1)[0].encode()
    if family != key.ktag:
        return sig.result("permerror", f"key type {key.ktag.decode()} does not match a="
                                       f"{sig.algorithm}")
    hashes = key.tags.get(b"h")
    if hashes and sig.algorithm.rsplit("-", 1)[-1].encode() not in [
            h.strip().lower() for h in hashes.split(b":")]:
        return sig.result("permerror", "key record's h= does not allow this hash")
    if key.ktag == b"rsa" and key.bits < opts.min_rsa_bits:
        return sig.result("fail", f"RSA key of {key.bits} bits is below the minimum of "
                                  f"{opts.min_rsa_bits}", key.bits)
    flags = [f.strip() for f in key.tags.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in sig.tags:
        i_domain = _text(sig.tags[b"i"]).rpartition("@")[2].lower()
        if i_domain != sig.domain:
            return sig.result("fail", "key requires i= domain to equal d= (t=s)", key.bits)
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = (
        key.pk, key.bits, key.ktag, key.tlsrpt)
    if key.openssl is not None and sig.algorithm == "rsa-sha256":  # see OpenSSLRSAKey
        verifier.pk, verifier.ktag = key.openssl, b"ed25519"
    include = [h.strip().lower() for h in re.split(rb":", sig.tags[b"h"])]
    received = verifier.headers, verifier.body
    tags, verifier.headers, sig_header, verifier.body = _canonical_once(
        sig.tags, verifier.headers, [sig.header[0], without_b(sig.header[1])], verifier.body)
    try:
        ok = verifier.verify_sig_process(tags, include, sig_header, None)
    except dkim.ValidationError as exc:
        if "body hash" in str(exc):
            return sig.result("fail", "body hash did not verify", key.bits)
        return sig.result("permerror", str(exc), key.bits)
    except Exception as exc:  # dkimpy format errors, odd signatures
        return sig.result("permerror", f"verification error: {exc}", key.bits)
    finally:
        verifier.headers, verifier.body = received
    if not ok:
        return sig.result("fail", "signature did not verify", key.bits)
    if b"l" in sig.tags and not opts.allow_body_length:
        return sig.result("policy", "l= signs only part of the body", key.bits)
    return sig.result("pass", "", key.bits)


# dkimpy's relaxed canonicalization (RFC 6376 3.4.2, 3.4.4) runs regular expressions through
# module-level re calls: two for every signed header field, and two over the whole body, the
# second replacing every single space by a space (about 290 us for 10 KB of text, more than the
# rest of a verification). Most bodies and fields have no white space that relaxed changes (no
# tab, no run of spaces, none before a line end), which C searches tell; where they do, only
# the runs that change are replaced. What is canonicalized here is handed to dkimpy under
# "simple", which leaves it as it is (simple keeps header fields as they are, and a body that
# ends with exactly one CRLF), so dkimpy hashes the same bytes: tests/test_auth_unit.py compares
# the bytes hashed both ways over generated fields, signatures and bodies, and relaxed-signed
# messages verify end to end. An empty canonical body, which simple would turn into a CRLF,
# and any c= value but the four exact forms stay dkimpy's alone.
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_THAT_CHANGES = re.compile(rb"\t[\t ]*| [\t ]+")


def relaxed_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """``dkim.canonicalization.Relaxed.canonicalize_headers`` of one field."""
    value = value.replace(b"\r\n", b"").replace(b"\n", b"")  # its unfold_header_value
    if b"\t" in value or b"  " in value:
        value = _WSP_THAT_CHANGES.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """``dkim.canonicalization.Relaxed.canonicalize_body(body)``, without its cost."""
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_THAT_CHANGES.sub(b" ", body)
    return correct_empty_body(strip_trailing_lines(body))


def _canonical_once(tags: dict, headers: list, sig_header: list, body: bytes
                    ) -> tuple[dict, list, list, bytes]:
    """(tags, header fields, signature field, body) to hand dkimpy: the relaxed parts of c=
    canonicalized here and c= saying simple for them; the rest as it is."""
    head, slash, tail = tags.get(b"c", b"").partition(b"/")
    if not slash or head not in (b"simple", b"relaxed") or tail not in (b"simple", b"relaxed"):
        return tags, headers, sig_header, body
    if tail == b"relaxed":
        canonical = relaxed_body(body)
        if canonical:
            body, tail = canonical, b"simple"
    if head == b"relaxed":
        headers = [relaxed_header(name, value) for name, value in headers]
        sig_header = list(relaxed_header(*sig_header))
        head = b"simple"
    return {**tags, b"c": head + b"/" + tail}, headers, sig_header, body


# dkimpy empties the signature's b= tag before hashing the DKIM-Signature field with
# dkim.RE_BTAG, whose nested optional folding white space makes the engine retry at every
# character of the base64 value (about 40 us a signature, a fifth of a verification). Its
# FWS, ``(?:(?:\s*\r?\n)?\s+)?``, matches exactly the runs of white space, so the value it
# removes is the longest run of base64 characters and white space that ends with a base64
# character (and a line break that ends the field): this finds the same, at once.
# dkimpy's own sub then finds nothing more to remove (tests/test_auth_unit.py compares both
# over generated fields).
_BTAG = re.compile(rb"([;\s]b\s*=)([a-zA-Z0-9+/=\s]*)")
_WSP = b" \t\n\r\x0b\x0c"  # what \s matches in a bytes pattern


def without_b(value: bytes) -> bytes:
    """``dkim.RE_BTAG.sub(rb"\\1", value)``: the DKIM-Signature value with b= emptied."""
    def empty(m: re.Match) -> bytes:
        run = m.group(2)
        tail = run[len(run.rstrip(_WSP)):]  # white space after the last base64 character
        if m.end() == len(value) and tail in (b"\r\n", b"\n"):
            tail = b""  # RE_BTAG's (?:\r?\n\Z)?
        return m.group(1) + tail

    return _BTAG.sub(empty, value)


def _verify_all(verifier: dkim.DKIM, sigs: list[_Sig], keys: dict[str, _Key],
                opts: DkimOptions) -> list[DkimResult]:
    # dkimpy canonicalizes every header field of the message and then picks the signed ones;
    # each signature is shown only the fields its h= names (in their order, so it picks the
    # same ones: each field is canonicalized on its own), which hashes the same bytes
    every = verifier.headers
    results = []
    try:
        for sig in sigs:
            if sig.early is not None:
                results.append(sig.early)
                continue
            named = {h.strip().lower() for h in sig.tags[b"h"].split(b":")}
            verifier.headers = [h for h in every if h[0].lower() in named]
            results.append(_verify(verifier, sig, keys[_key_name(sig)], opts))
    finally:
        verifier.headers = every
    return results


def _key_name(sig: _Sig) -> str:
    return f"{sig.selector}._domainkey.{sig.domain}"


def has_signature(raw: bytes) -> bool:
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    return re.search(rb"(?im)^dkim-signature[ \t]*:", head) is not None


class DkimVerifier:
    """Built once per gateway; keeps the last parsed keys (by record text) so a cached TXT
    record is not parsed again for every message."""

    def __init__(self, resolver: Resolver, parsed_keys: int = 256) -> None:
        self.resolver = resolver
        self._parsed: OrderedDict[tuple[str, bytes | None], _Key] = OrderedDict()
        self._parsed_max = parsed_keys

    async def verify(self, raw: bytes, opts: DkimOptions, fields: tuple = ()
                     ) -> list[DkimResult]:
        """One result per DKIM-Signature (the first ``max_signatures``); [] when unsigned.
        ``fields``: the message's header fields as gateway.message.headers split them."""
        if not has_signature(raw):
            return []
        big = len(raw) > INLINE_LIMIT
        if big:
            verifier, sigs, error = await asyncio.to_thread(_prepare, raw, opts, fields)
        else:
            verifier, sigs, error = _prepare(raw, opts, fields)
        if verifier is None:
            return [DkimResult("permerror", reason=printable(error))]
        names = sorted({_key_name(s) for s in sigs if s.early is None})
        if len(names) == 1:  # the usual case: one key, awaited without a task of its own
            fetched = [await self._key(names[0])]
        else:
            fetched = await asyncio.gather(*(self._key(n) for n in names))
        keys = dict(zip(names, fetched))
        if big:
            return await asyncio.to_thread(_verify_all, verifier, sigs, keys, opts)
        return _verify_all(verifier, sigs, keys, opts)

    async def _key(self, name: str) -> _Key:
        try:
            records = await self.resolver.txt(name)
        except DnsTempError as exc:
            return _Key(error=DkimResult("temperror", reason=f"key look-up failed: {exc}"))
        except DnsNameError:
            return _Key(error=DkimResult("permerror", reason=f"no key record at {name}"))
        record = records[0] if records else None
        key = self._parsed.get((name, record))
        if key is None:
            key = _parse_key(record, name)
            self._parsed[(name, record)] = key
            if len(self._parsed) > self._parsed_max:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end((name, record))
        return key

