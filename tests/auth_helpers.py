"""Shared material for the sender-authentication tests (tests/test_auth*.py): keys generated for
the run (openssl for RSA, PyNaCl for Ed25519), DKIM signing with dkimpy at a chosen time, the
RFC 8463 Appendix A example, and the DNS world Knot serves (tests/dns_server.py)."""

from __future__ import annotations

import base64
import functools
import hashlib
import subprocess
import tempfile
from pathlib import Path

import dkim
import nacl.encoding
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS, parse_pem_private_key

from tests.dns_server import txt, zone_text

NOW = 1793631600  # 2026-11-02 15:00:00 UTC, the tests' FakeClock start


# --- keys -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rsa_key(bits: int, tag: str = "") -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, base64 SubjectPublicKeyInfo for p=), made with openssl."""
    with tempfile.TemporaryDirectory() as d:
        key = Path(d) / "key.pem"
        subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(key), str(bits)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return key.read_bytes(), base64.b64encode(der).decode()


@functools.lru_cache(maxsize=None)
def ed_key(tag: str = "") -> tuple[bytes, str]:
    """(base64 Ed25519 seed as dkimpy signs with, base64 public key for p=)."""
    sk = nacl.signing.SigningKey.generate()
    return (base64.b64encode(bytes(sk)), base64.b64encode(bytes(sk.verify_key)).decode())


def key_record(p: str, k: str = "rsa", extra: str = "") -> str:
    return f"v=DKIM1; k={k}; {extra}p={p}"


# --- signing ----------------------------------------------------------------------------

def sign(message: bytes, selector: str, domain: str, *, bits: int = 2048,
         algorithm: str = "rsa-sha256", t: int | None = NOW - 60, x: int | None = None,
         length: bool = False, include: list[str] | None = None,
         canon: tuple[bytes, bytes] = (b"relaxed", b"simple"), identity: str | None = None,
         key: bytes | None = None) -> bytes:
    """``message`` with a DKIM-Signature prepended, made by dkimpy with the run's key for
    ``algorithm`` (RSA of ``bits``, or Ed25519), signed at ``t`` (the tests' clock, not the
    system's) and expiring at ``x``."""
    alg = algorithm.encode()
    d = dkim.DKIM(message, signature_algorithm=alg)
    if algorithm.startswith("ed25519"):
        pk = nacl.signing.SigningKey(key or ed_key()[0], encoder=nacl.encoding.Base64Encoder)
    else:
        pk = parse_pem_private_key(key or rsa_key(bits)[0])
    policy = CanonicalizationPolicy.from_c_value(b"/".join(canon))
    headers = [h.lower().encode() for h in include] if include else [
        h.lower() for h in d.default_sign_headers()]
    body = policy.canonicalize_body(d.body)
    d.hasher = HASH_ALGORITHMS[alg]
    bh = base64.b64encode(d.hasher(body).digest())
    fields = [(b"v", b"1"), (b"a", alg), (b"c", policy.to_c_value()), (b"d", domain.encode()),
              (b"i", (identity or "@" + domain).encode())]
    if length:
        fields.append((b"l", str(len(body)).encode()))
    fields += [(b"q", b"dns/txt"), (b"s", selector.encode())]
    if t is not None:
        fields.append((b"t", str(t).encode()))
    if x is not None:
        fields.append((b"x", str(x).encode()))
    fields += [(b"h", b" : ".join(headers)), (b"bh", bh), (b"b", b"0" * 60)]
    value = d.gen_header(fields, headers, policy, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + value + message


def message(from_: str = "Acme News <news@pass.acme.example>", subject: str = "Hello",
            body: bytes = b"Hello, world.\r\n", extra: list[str] = (),
            unsubscribe: str | None = "<mailto:unsub-1@pass.acme.example>") -> bytes:
    lines = [f"From: {from_}"] if from_ is not None else []
    lines += ["To: Alice <alice@example.edu>", f"Subject: {subject}",
              "Date: Mon, 02 Nov 2026 15:00:00 +0000",
              f"Message-ID: <{hashlib.sha1(subject.encode() + body).hexdigest()[:16]}"
              "@pass.acme.example>"]
    if unsubscribe:
        lines.append(f"List-Unsubscribe: {unsubscribe}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ten_kb_body() -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; policy IV.B.3.c.iii in action.\r\n"
    return line * (10240 // len(line) + 1)


# --- RFC 8463 Appendix A ------------------------------------------------------------------

RFC8463_ED25519_P = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA_P = ("MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6w"
                 "y5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKr"
                 "M3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB")
RFC8463_MESSAGE = "\r\n".join([
    "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
    " d=football.example.com; i=@football.example.com;",
    " q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
    " subject : date : message-id : from : subject : date;",
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    " b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
    " Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
    " d=football.example.com; i=@football.example.com;",
    " q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
    " date : message-id : from : subject : date;",
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    " b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
    " DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
    " dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
    "From: Joe SixPack <joe@football.example.com>",
    "To: Suzie Q <suzie@shopping.example.net>",
    "Subject: Is dinner ready?",
    "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
    "Message-ID: <20030712040037.46341.5F8J@football.example.com>",
    "",
    "Hi.",
    "",
    "We lost the game.  Are you hungry yet?",
    "",
    "Joe.",
    ""]).encode()


# --- the DNS world ------------------------------------------------------------------------

SPF_PASS = "v=spf1 ip4:127.0.0.1 ip6:::1 -all"


def example_records() -> list[tuple[str, str, str]]:
    """Zone ``example.``: the test sender's domains, their SPF records for each result, and
    DKIM keys. Owners are relative to ``example.``."""
    records = [
        # SPF, one MAIL FROM domain per result (client is 127.0.0.1)
        ("pass.acme", "TXT", txt(SPF_PASS)),
        ("pass.acme", "A", "192.0.2.10"),
        ("fail.acme", "TXT", txt("v=spf1 ip4:192.0.2.1 -all")),
        ("soft.acme", "TXT", txt("v=spf1 ip4:192.0.2.1 ~all")),
        ("neutral.acme", "TXT", txt("v=spf1 ?all")),
        ("none.acme", "A", "192.0.2.10"),
        ("none.acme", "TXT", txt("some other text record")),
        ("perm.acme", "TXT", txt("v=spf1 " + " ".join(f"a:l{i}.acme.example" for i in
                                                       range(1, 12)) + " ip4:127.0.0.1 -all")),
        ("void.acme", "TXT", txt("v=spf1 a:nx1.acme.example a:nx2.acme.example "
                                 "a:nx3.acme.example ip4:127.0.0.1 -all")),
        ("temp.acme", "TXT", txt("v=spf1 include:spf.refused.test ip4:127.0.0.1 -all")),
        ("mail.acme-mail", "TXT", txt(SPF_PASS)),
        ("other", "TXT", txt(SPF_PASS)),
        # a record whose result depends on the local part (RFC 7208 7.2 %{l})
        ("macro.acme", "TXT", txt("v=spf1 exists:%{l}.users.acme.example -all")),
        ("bounce-ok.users.acme", "A", "127.0.0.2"),
    ]
    records += [(f"l{i}.acme", "A", f"192.0.2.{100 + i}") for i in range(1, 12)]
    # DKIM keys: d=acme.example (registered) and d=evil.example (not)
    records += [
        ("rsa1024._domainkey.acme", "TXT", txt(key_record(rsa_key(1024)[1]))),
        ("rsa2048._domainkey.acme", "TXT", txt(key_record(rsa_key(2048)[1]))),
        ("ed._domainkey.acme", "TXT", txt(key_record(ed_key()[1], "ed25519"))),
        ("weak._domainkey.acme", "TXT", txt(key_record(rsa_key(512)[1]))),
        ("revoked._domainkey.acme", "TXT", txt("v=DKIM1; k=rsa; p=")),
        ("sha1only._domainkey.acme", "TXT", txt(key_record(rsa_key(2048)[1], extra="h=sha1; "))),
        ("strict._domainkey.acme", "TXT", txt(key_record(rsa_key(2048)[1], extra="t=s; "))),
        ("garbage._domainkey.acme", "TXT", txt("v=DKIM1; k=rsa; p=bm90IGEga2V5")),
        ("rsa2048._domainkey.evil", "TXT", txt(key_record(rsa_key(2048)[1]))),
        ("rsa2048._domainkey.acme-mail", "TXT", txt(key_record(rsa_key(2048)[1]))),
    ]
    return records


def football_records() -> list[tuple[str, str, str]]:
    """Zone ``football.example.com.``: RFC 8463 A.2's key records, and SPF for the test."""
    return [
        ("brisbane._domainkey", "TXT", txt(key_record(RFC8463_ED25519_P, "ed25519"))),
        ("test._domainkey", "TXT", txt(key_record(RFC8463_RSA_P))),
        ("@", "TXT", txt("v=spf1 -all")),
    ]


def auth_zones() -> dict[str, str]:
    return {"example": zone_text("example", example_records()),
            "football.example.com": zone_text("football.example.com", football_records())}


SENDER = """
id = "acme"
organization = "Acme Marketing Cloud"
contact = "postmaster@acme.example"
networks = ["127.0.0.1/32", "::1/128"]
domains = ["acme.example", "acme-mail.example"]
return_path = ["bounce-*@pass.acme.example", "bounce-*@fail.acme.example",
               "bounce-*@soft.acme.example", "bounce-*@neutral.acme.example",
               "bounce-*@none.acme.example", "bounce-*@perm.acme.example",
               "bounce-*@void.acme.example", "bounce-*@temp.acme.example",
               "bounce-*@mail.acme-mail.example", "bounce-*@macro.acme.example"]
expires = 2027-06-30
"""
