"""DKIM verification (policy IV.B.3.c.iii) against keys served by a real Knot DNS server:
RSA 1024/2048, Ed25519, the RFC 8463 example, and each way a signature fails."""

from __future__ import annotations

import pytest

from gateway.checks.auth_dkim import DkimOptions, DkimVerifier
from gateway.infra.clock import FakeClock
from gateway.infra.dns import Resolver
from tests.auth_helpers import NOW, RFC8463_MESSAGE, auth_zones, message, sign
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, SilentNameserver

pytestmark = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), auth_zones())
    yield server
    server.stop()


@pytest.fixture
async def verify(knot):
    resolver = Resolver(clock=FakeClock(), nameservers=(knot.address,), timeout=2.0)

    async def run(raw: bytes, **options):
        return await DkimVerifier(resolver).verify(raw, DkimOptions(now=NOW, **options))

    yield run
    await resolver.close()


def results(found):
    return [(r.result, r.domain, r.selector, r.reason) for r in found]


@pytest.mark.parametrize("selector,bits,algorithm", [
    ("rsa1024", 1024, "rsa-sha256"), ("rsa2048", 2048, "rsa-sha256"),
    ("ed", 0, "ed25519-sha256")])
async def test_valid_signatures_pass(verify, selector, bits, algorithm):
    [r] = await verify(sign(message(), selector, "acme.example", bits=bits, algorithm=algorithm))
    assert (r.result, r.domain, r.selector, r.algorithm, r.reason) == (
        "pass", "acme.example", selector, algorithm, "")
    assert r.key_bits == (bits or 256)
    assert len(r.b) == 12


async def test_simple_and_relaxed_canonicalization_pass(verify):
    for canon in [(b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"simple", b"relaxed")]:
        [r] = await verify(sign(message(), "rsa2048", "acme.example", canon=canon))
        assert r.result == "pass", canon


@pytest.mark.parametrize("header", [b"simple", b"relaxed"])
async def test_relaxed_body_tolerates_white_space_changes_and_nothing_more(verify, header):
    """c=*/relaxed: the body is canonicalized by the gateway (gateway.checks.auth_dkim.
    relaxed_body) and handed to dkimpy as simple; what relaxed allows still passes, any other
    change fails, and the simple body canonicalization allows no white space change at all."""
    body = b"Hello,  world.\t\r\nSecond line \r\n\r\n\r\n"
    relaxed = sign(message(body=body), "rsa2048", "acme.example", canon=(header, b"relaxed"))
    simple = sign(message(body=body), "rsa2048", "acme.example", canon=(header, b"simple"))
    spaced = b"Hello, \t world.  \r\nSecond \t line\r\n\r\n"  # relaxed-equal
    for raw, changed, expected in [
            (relaxed, body, "pass"), (relaxed, spaced, "pass"),
            (relaxed, b"Hello, world!\r\nSecond line\r\n", "fail"),
            (relaxed, b"Hello,world.\r\nSecond line\r\n", "fail"),  # a run is not removed
            (simple, body, "pass"), (simple, spaced, "fail")]:
        [r] = await verify(raw.replace(body, changed))
        assert (r.result, r.reason) == (
            (expected, "") if expected == "pass" else (expected, "body hash did not verify"))


@pytest.mark.parametrize("body", [b"", b"\r\n", b" \r\n\t\r\n"])
async def test_relaxed_empty_body_passes(verify, body):
    # relaxed makes these the empty body, which dkimpy canonicalizes itself
    [r] = await verify(sign(message(body=body), "rsa2048", "acme.example",
                            canon=(b"relaxed", b"relaxed")))
    assert r.result == "pass"


async def test_rfc8463_example_both_signatures_pass(verify):
    found = await verify(RFC8463_MESSAGE)
    assert [(r.result, r.domain, r.selector, r.algorithm, r.key_bits) for r in found] == [
        ("pass", "football.example.com", "brisbane", "ed25519-sha256", 256),
        ("pass", "football.example.com", "test", "rsa-sha256", 1024)]


async def test_rfc8463_example_altered_fails_both(verify):
    altered = RFC8463_MESSAGE.replace(b"Is dinner ready?", b"Is dinner ready!")
    assert [r.result for r in await verify(altered)] == ["fail", "fail"]


async def test_every_signature_is_verified_and_reported_in_order(verify):
    raw = sign(sign(message(), "ed", "acme.example", algorithm="ed25519-sha256"),
               "rsa2048", "evil.example")
    assert [(r.result, r.domain, r.selector) for r in await verify(raw)] == [
        ("pass", "evil.example", "rsa2048"), ("pass", "acme.example", "ed")]


async def test_unsigned_message_has_no_results(verify):
    assert await verify(message()) == []


async def test_tampered_body_fails(verify):
    raw = sign(message(), "rsa2048", "acme.example").replace(b"Hello, world.", b"Hello, World!")
    assert results(await verify(raw)) == [
        ("fail", "acme.example", "rsa2048", "body hash did not verify")]


async def test_tampered_signed_header_fails(verify):
    raw = sign(message(subject="Hello"), "rsa2048", "acme.example").replace(
        b"Subject: Hello", b"Subject: Hullo")
    assert results(await verify(raw)) == [
        ("fail", "acme.example", "rsa2048", "signature did not verify")]


async def test_added_from_header_breaks_the_signature(verify):
    raw = sign(message(), "rsa2048", "acme.example")
    raw = raw.replace(b"To: Alice", b"From: someone@evil.example\r\nTo: Alice", 1)
    assert [r.result for r in await verify(raw)] == ["fail"]


async def test_unsigned_header_may_be_added(verify):
    raw = sign(message(), "rsa2048", "acme.example")
    assert [r.result for r in await verify(raw + b"")] == ["pass"]
    raw = raw.replace(b"To: Alice", b"X-Mailer: something\r\nTo: Alice", 1)
    assert [r.result for r in await verify(raw)] == ["pass"]


async def test_expired_signature_fails(verify):
    raw = sign(message(), "rsa2048", "acme.example", t=NOW - 86400 * 2, x=NOW - 86400)
    assert results(await verify(raw)) == [
        ("fail", "acme.example", "rsa2048", "signature expired (x= is in the past)")]


async def test_expiry_within_clock_skew_still_passes(verify):
    raw = sign(message(), "rsa2048", "acme.example", t=NOW - 3600, x=NOW - 100)
    assert [r.result for r in await verify(raw, clock_skew=300)] == ["pass"]
    assert [r.result for r in await verify(raw, clock_skew=0)] == ["fail"]


async def test_signature_from_the_future_is_not_accepted(verify):
    raw = sign(message(), "rsa2048", "acme.example", t=NOW + 86400)
    assert results(await verify(raw)) == [
        ("policy", "acme.example", "rsa2048", "signature timestamp (t=) is in the future")]


async def test_x_before_t_is_malformed(verify):
    raw = sign(message(), "rsa2048", "acme.example", t=NOW, x=NOW - 10)
    assert [r.result for r in await verify(raw, clock_skew=86400)] == ["neutral"]


async def test_512_bit_key_fails_and_minimum_is_configurable(verify):
    raw = sign(message(), "weak", "acme.example", bits=512)
    assert results(await verify(raw)) == [
        ("fail", "acme.example", "weak", "RSA key of 512 bits is below the minimum of 1024")]
    raw = sign(message(), "rsa1024", "acme.example", bits=1024)
    [r] = await verify(raw, min_rsa_bits=2048)
    assert (r.result, r.reason) == ("fail", "RSA key of 1024 bits is below the minimum of 2048")


async def test_rsa_sha1_is_not_accepted(verify):
    raw = sign(message(), "rsa2048", "acme.example", algorithm="rsa-sha1")
    assert results(await verify(raw)) == [
        ("fail", "acme.example", "rsa2048", "rsa-sha1 signatures are not accepted (RFC 8301)")]


async def test_body_length_limit_is_policy_unless_allowed(verify):
    raw = sign(message(), "rsa2048", "acme.example", length=True)
    appended = raw + b"Appended advertising.\r\n"
    assert results(await verify(appended)) == [
        ("policy", "acme.example", "rsa2048", "l= signs only part of the body")]
    assert [r.result for r in await verify(appended, allow_body_length=True)] == ["pass"]


async def test_missing_revoked_and_unusable_keys_are_permerrors(verify):
    cases = {"nokey": "no key record at nokey._domainkey.acme.example",
             "revoked": "key revoked (empty p=)"}
    for selector, reason in cases.items():
        [r] = await verify(sign(message(), selector, "acme.example"))
        assert (r.result, r.reason) == ("permerror", reason)
    [r] = await verify(sign(message(), "garbage", "acme.example"))
    assert r.result == "permerror" and r.reason.startswith("unusable key")


async def test_key_restrictions_are_honoured(verify):
    [r] = await verify(sign(message(), "sha1only", "acme.example"))
    assert (r.result, r.reason) == ("permerror", "key record's h= does not allow this hash")
    [r] = await verify(sign(message(), "ed", "acme.example", algorithm="rsa-sha256"))
    assert r.result == "permerror" and "does not match" in r.reason
    [r] = await verify(sign(message(), "strict", "acme.example", identity="news@sub.acme.example"))
    assert (r.result, r.reason) == ("fail", "key requires i= domain to equal d= (t=s)")
    [r] = await verify(sign(message(), "strict", "acme.example", identity="news@acme.example"))
    assert r.result == "pass"


async def test_signature_without_from_in_h_is_a_permerror(verify):
    raw = sign(message(), "rsa2048", "acme.example", include=["subject", "to"])
    [r] = await verify(raw)
    assert (r.result, r.reason) == ("permerror", "From: is not signed (h= lacks from)")


async def test_malformed_signature_is_neutral(verify):
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example; this is not tag=value\r\n" + \
        message()
    [r] = await verify(raw)
    assert r.result == "neutral" and r.reason.startswith("malformed signature")
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example; s=x; h=from; bh=AAAA\r\n" + \
        message()
    [r] = await verify(raw)
    assert r.result == "neutral" and r.reason.startswith("malformed signature: missing b")


async def test_only_max_signatures_are_verified(verify):
    raw = message()
    for _ in range(4):
        raw = sign(raw, "rsa2048", "acme.example")
    assert len(await verify(raw, max_signatures=2)) == 2


async def test_key_lookup_timeout_is_temperror():
    silent = SilentNameserver()
    resolver = Resolver(clock=FakeClock(), nameservers=(silent.address,), timeout=0.3)
    try:
        [r] = await DkimVerifier(resolver).verify(sign(message(), "rsa2048", "acme.example"),
                                                  DkimOptions(now=NOW))
    finally:
        await resolver.close()
        silent.close()
    assert r.result == "temperror" and r.reason.startswith("key look-up failed: DNS timeout")


@pytest.mark.parametrize("tamper", [None, (b"Subject: Hello", b"Subject: Hullo"),
                                    (b"Hello, world.", b"Hello, World!")])
async def test_openssl_rsa_agrees_with_dkimpys_arithmetic(verify, monkeypatch, tamper):
    """RSA signatures are checked through OpenSSL (auth_dkim.OpenSSLRSAKey); with the OpenSSL
    key taken away, dkimpy's own pure-Python RSA gives the same result for the same bytes."""
    from gateway.checks import auth_dkim

    raw = sign(message(subject="Hello"), "rsa2048", "acme.example")
    if tamper:
        raw = raw.replace(*tamper)
    calls = []
    original = auth_dkim.OpenSSLRSAKey.verify
    monkeypatch.setattr(auth_dkim.OpenSSLRSAKey, "verify",
                        lambda self, d, s: calls.append(d) or original(self, d, s))
    with_openssl = results(await verify(raw))
    assert len(calls) == (0 if tamper and b"World" in tamper[1] else 1)  # body hash first
    monkeypatch.setattr(auth_dkim, "_openssl_rsa", lambda pk: None)
    assert results(await verify(raw)) == with_openssl
    assert with_openssl[0][0] == ("pass" if tamper is None else "fail")
