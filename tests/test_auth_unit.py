"""Sender-authentication pieces that need no DNS: From: parsing, registered domains, alignment
with the Public Suffix List, the Authentication-Results format, header stripping, settings."""

from __future__ import annotations

import email.parser
import email.policy
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks.auth_alignment import Aligner, FromError, author_domain, registered
from gateway.checks.auth_dkim import DkimResult, has_signature
from gateway.checks.auth_dmarc import DmarcResult
from gateway.checks.auth_results import authserv_id, claims, format_value, quote
from gateway.checks.auth_spf import SpfResult
from gateway.checks.base import strip_header_fields
from gateway.infra.config import load_config
from gateway.infra.typed import ConfigError

PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def parse(head: str):
    return PARSER.parsebytes(head.replace("\n", "\r\n").encode() + b"\r\nbody\r\n")


@pytest.mark.parametrize("head,domain", [
    ("From: news@Em.Acme.Example\n", "em.acme.example"),
    ("From: Acme News <news@em.acme.example>\n", "em.acme.example"),
    ('From: "Acme, News" <news@em.acme.example>\n', "em.acme.example"),
    ("From: =?utf-8?q?Acme?= <news@em.acme.example.>\n", "em.acme.example"),
    ("From: news@xn--bcher-kva.example\n", "xn--bcher-kva.example"),
])
def test_author_domain(head, domain):
    assert author_domain(parse(head)) == domain


@pytest.mark.parametrize("head,error", [
    ("Subject: x\n", "Message has no From: header"),
    ("From: a@x.example\nFrom: b@x.example\n", "Message has 2 From: headers"),
    ("From: a@x.example, b@x.example\n", r"From: must hold exactly one address \(found 2\)"),
    ("From: Group: a@x.example, b@y.example;\n", "found 2"),
    ("From: undisclosed\n", "From: address has no valid domain"),
    ("From: a@localhost\n", "From: address has no valid domain"),
    ("From: news@b\u00fccher.example\n", "From: address has an invalid domain"),
])
def test_author_domain_refuses(head, error):
    with pytest.raises(FromError, match=error):
        author_domain(parse(head))


def test_registered_domains_and_subdomains():
    assert registered("acme.example", ("acme.example",))
    assert registered("em.acme.example.", ("acme.example",))
    assert not registered("notacme.example", ("acme.example",))
    assert not registered("example", ("acme.example",))


def test_relaxed_and_strict_alignment():
    a = Aligner()
    assert a.organizational("em.acme.example") == "acme.example"
    assert a.organizational("mail.example.co.uk") == "example.co.uk"
    assert a.aligned("bounce.em.acme.example", "em.acme.example")
    assert not a.aligned("acme.example", "acme-mail.example")
    assert not a.aligned("a.example.co.uk", "b.other.co.uk")  # co.uk is a public suffix
    assert not a.aligned("user1.github.io", "user2.github.io")  # private suffix section
    assert a.aligned("em.acme.example", "EM.acme.example.", "strict")
    assert not a.aligned("bounce.em.acme.example", "em.acme.example", "strict")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["em.acme.example", "EM.Acme.Example.", "mail.example.co.uk",
                                 "user1.github.io", "co.uk", "example", "a.b.c.example.com.",
                                 "x.y.z.blogspot.com", "localhost", ""]), max_size=30))
def test_organizational_domain_memo_answers_as_the_list(domains):
    # remembered or not (a tiny memo is emptied while the same domains come back), the answer
    # is the Public Suffix List's for the lower-cased domain without its final dot
    a = Aligner()
    a.MEMO_MAX = 3
    for domain in domains:
        key = domain.lower().rstrip(".")
        assert a.organizational(domain) == (a.psl.privatesuffix(key) or key)
        assert len(a._memo) <= 3


def test_authentication_results_value():
    spf = [SpfResult("mailfrom", "em.acme.example", "pass"),
           SpfResult("helo", "mx.acme.example", "softfail", 'owner "discourages" it')]
    dkim = [DkimResult("pass", "acme.example", "s1", "rsa-sha256", "ab/c+d=", "", 2048),
            DkimResult("fail", "acme.example", "s2", "ed25519-sha256", "xyz", "body hash did "
                       "not verify")]
    assert format_value("gw.test", spf, dkim, "pass", "em.acme.example").split(";\r\n\t") == [
        "gw.test",
        "spf=pass smtp.mailfrom=em.acme.example",
        'spf=softfail reason="owner \\"discourages\\" it" smtp.helo=mx.acme.example',
        'dkim=pass (2048-bit key) header.d=acme.example header.s=s1 header.b="ab/c+d="',
        'dkim=fail reason="body hash did not verify" header.d=acme.example header.s=s2 '
        "header.b=xyz",
        "x-ecomm-alignment=pass header.from=em.acme.example"]
    assert "dkim=none" in format_value("gw.test", spf[:1], [], "fail", "x.example")


@pytest.mark.parametrize("result,expected", [
    (DmarcResult("pass", "em.acme.example", "reject"), "dmarc=pass (p=reject)"),
    (DmarcResult("fail", "em.acme.example", "reject", "reject", reason="no SPF or DKIM pass"),
     "dmarc=fail (p=reject)"),
    (DmarcResult("fail", "em.acme.example", "reject", "quarantine", 50),
     "dmarc=fail (p=reject pct=50 dis=quarantine)"),
    (DmarcResult("none", "em.acme.example", reason="no DMARC record at _dmarc.acme.example"),
     'dmarc=none reason="no DMARC record at _dmarc.acme.example"'),
    (DmarcResult("temperror", "em.acme.example", reason="DMARC record look-up failed"),
     'dmarc=temperror reason="DMARC record look-up failed"'),
])
def test_dmarc_is_reported_before_the_gateways_own_alignment(result, expected):
    spf = [SpfResult("mailfrom", "em.acme.example", "pass")]
    parts = format_value("gw.test", spf, [], "pass", "em.acme.example", "", result
                         ).split(";\r\n\t")
    assert parts[-2:] == [f"{expected} header.from=em.acme.example",
                          "x-ecomm-alignment=pass header.from=em.acme.example"]


def test_quote():
    assert quote("pass.acme.example") == "pass.acme.example"
    assert quote("a b") == '"a b"'
    assert quote("a/b") == '"a/b"'


@pytest.mark.parametrize("value,ident", [
    ("gw.test; spf=pass", "gw.test"),
    (" (our gateway) GW.Test ; spf=pass", "GW.Test"),
    ('"gw.test"; none', "gw.test"),
    ("gw.test 1; none", "gw.test"),
    ("(a (nested) comment)gw.test;", "gw.test"),
    ("", ""),
])
def test_authserv_id(value, ident):
    assert authserv_id(value) == ident


def test_strip_header_fields_removes_folded_fields_byte_exactly():
    raw = (b"Received: from x\r\n\tby y\r\n"
           b"Authentication-Results: gw.test;\r\n\tspf=pass\r\n"
           b"authentication-results: other.test; spf=fail\r\n"
           b"Subject: kept\r\n\r\nAuthentication-Results: gw.test; in the body\r\n")
    out = strip_header_fields(raw, [claims("gw.test")])
    assert out == (b"Received: from x\r\n\tby y\r\n"
                   b"authentication-results: other.test; spf=fail\r\n"
                   b"Subject: kept\r\n\r\nAuthentication-Results: gw.test; in the body\r\n")
    assert strip_header_fields(raw, [claims("elsewhere.test")]) is raw
    assert strip_header_fields(raw, []) is raw


def test_has_signature_looks_only_at_the_header():
    assert has_signature(b"DKIM-Signature: v=1\r\nFrom: a@b.example\r\n\r\nbody")
    assert has_signature(b"From: a@b.example\r\ndkim-signature : v=1\r\n\r\nbody")
    assert not has_signature(b"From: a@b.example\r\n\r\nDKIM-Signature: v=1\r\n")


def test_settings_are_validated(tmp_path):
    path = tmp_path / "gateway.toml"

    def load(table: str):
        path.write_text("[checks.sender_auth]\n" + textwrap.dedent(table))
        return load_config(path).checks["sender_auth"]

    s = load('require = "dkim"\non_fail = "quarantine"\nmin_rsa_bits = 2048\n')
    assert (s.require, s.on_fail, s.min_rsa_bits, s.mode) == ("dkim", "quarantine", 2048,
                                                              "enforce")
    for table, key in [('require = "either"', "require"), ("min_rsa_bits = 512", "min_rsa_bits"),
                       ('junk_header = "X Junk"', "junk_header"), ('on_fail = "drop"', "on_fail"),
                       ("max_signatures = 0", "max_signatures")]:
        with pytest.raises(ConfigError, match=rf"checks\.sender_auth\.{key}"):
            load(table)


def test_shipped_configuration_documents_every_key():
    from pathlib import Path

    from gateway.checks.sender_auth import SenderAuthSettings

    config = load_config(Path(__file__).parent.parent / "gateway.toml")
    assert config.checks["sender_auth"] == SenderAuthSettings()
    assert config.dns.nameservers == () and config.quarantine.dir == Path("var/quarantine")


_NAMES = ["From", "Subject", "DKIM-Signature", "X-a", "to", "Received"]
_VALUES = [b" a@b.example", b"", b" x\r\n y", b"\tfolded\r\n\tz", b" caf\xc3\xa9", b" v=1; h=from"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=6),
       st.sampled_from([b"", b"body\r\n", b"\r\n\r\nx\r\n", b"a\r\n.\r\n"]), st.booleans())
def test_dkim_split_from_the_gateways_fields_is_dkimpys_own(fields, body, separated):
    """DKIM verification takes the header fields the gateway already split (the canonical
    block, gateway.message.headers) instead of parsing them again: what dkimpy gets is what
    its own parser makes of the message."""
    import dkim

    from gateway.checks.auth_dkim import _split
    from gateway.message.headers import HeaderError, split

    raw = b"".join(n.encode() + b":" + v + b"\r\n" for n, v in fields) \
        + (b"\r\n" + body if separated else b"")
    try:
        block = split(raw)
    except HeaderError:
        return  # refused before any check: never verified
    assert _split(raw, block.fields) == dkim.rfc822_parse(raw)
    assert _split(raw) == dkim.rfc822_parse(raw)


_SIG_PIECES = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n\t", b";", b"b", b"=", b"h", b"bh",
               b"b=", b" b =", b"AB+/", b"x", b"v=1", b"a=rsa-sha256", b"\x0b", b"\xff", b":"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_SIG_PIECES), max_size=25))
def test_emptying_b_is_what_dkimpys_own_expression_does(pieces):
    """gateway.checks.auth_dkim.without_b (what dkimpy is handed, so that its slow RE_BTAG
    finds nothing left to do) is dkim.RE_BTAG.sub exactly, and RE_BTAG changes it no more."""
    import dkim

    from gateway.checks.auth_dkim import without_b

    value = b"".join(pieces)
    expected = dkim.RE_BTAG.sub(rb"\1", value)
    assert without_b(value) == expected
    assert dkim.RE_BTAG.sub(rb"\1", without_b(value)) == expected


_BODY_PIECES = [b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b"x", b"yz", b"\x0b", b"\xa0",
                b" \r\n", b"\t\r\n", b"\r\n\r\n", b".", b""]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_BODY_PIECES), max_size=30))
def test_relaxed_body_is_dkimpys_own(pieces):
    """gateway.checks.auth_dkim.relaxed_body (the relaxed body canonicalization done once,
    cheaply) is dkimpy's, and dkimpy's simple canonicalization leaves a non-empty result as it
    is (so handing it over under c=.../simple hashes the same bytes)."""
    from dkim.canonicalization import Relaxed, Simple

    from gateway.checks.auth_dkim import relaxed_body

    body = b"".join(pieces)
    expected = Relaxed.canonicalize_body(body)
    assert relaxed_body(body) == expected
    if expected:
        assert Simple.canonicalize_body(expected) == expected


_FIELD_NAMES = [b"From", b"from", b"SUBJECT", b"To ", b"x-Mailer\t", b"dkim-signature"]
_FIELD_PIECES = [b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\n", b"\r", b"a", b"Bc", b";",
                 b"b=", b" b =", b"AB+/=", b"\xc3\xa9", b"\x0b", b"bh=x"]
_C_VALUES = [b"relaxed/relaxed", b"relaxed/simple", b"simple/relaxed", b"simple/simple",
             b"relaxed", b"Relaxed/relaxed"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_FIELD_NAMES),
                          st.lists(st.sampled_from(_FIELD_PIECES), max_size=8)), max_size=6),
       st.lists(st.sampled_from(_FIELD_PIECES), max_size=12),
       st.lists(st.sampled_from(_BODY_PIECES), max_size=12),
       st.sampled_from(_C_VALUES), st.lists(st.sampled_from(_FIELD_NAMES), max_size=5))
def test_canonicalized_once_hashes_what_dkimpy_hashes(fields, sig_pieces, body_pieces, c, signed):
    """What gateway.checks.auth_dkim._canonical_once hands dkimpy (the relaxed parts of c=
    canonicalized by the gateway, c= saying simple for them) makes dkimpy hash exactly the
    bytes it hashes from the message as it is: the body, and the signed header fields with the
    signature field (b= emptied), in dkimpy's own order."""
    import hashlib

    from dkim import HashThrough, hash_headers
    from dkim.canonicalization import CanonicalizationPolicy

    from gateway.checks.auth_dkim import _canonical_once, without_b

    headers = [(name, b"".join(pieces) + b"\r\n") for name, pieces in fields]
    sig_header = [b"DKIM-Signature", without_b(b"".join(sig_pieces) + b"\r\n")]
    body = b"".join(body_pieces)
    include = [n.strip().lower() for n in signed]
    tags = {b"c": c, b"a": b"rsa-sha256"}

    def hashed(tags, headers, sig_header, body):
        try:
            policy = CanonicalizationPolicy.from_c_value(tags[b"c"])
        except Exception as exc:
            return ("invalid", type(exc).__name__)
        h = HashThrough(hashlib.sha256(), debug=True)
        hash_headers(h, policy, policy.canonicalize_headers(headers), list(include),
                     sig_header, tags)
        return policy.canonicalize_body(body), h.hashed()

    assert hashed(*_canonical_once(tags, headers, sig_header, body)) == \
        hashed(tags, headers, sig_header, body)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.sampled_from(["Acme News <news@em.acme.example>", "news@acme.example",
                                  " a b <x.y@ACME.example.> ", "<n@acme.example>",
                                  "a@b.example, c@d.example", "Name <a@b.example> x"]),
                 st.text(alphabet="ab01 \t<>@.,:;\"()[]\\é-", max_size=40)))
def test_author_domain_as_getaddresses_reads_it(text):
    """author_domain reads a plain From: value without the stdlib's parser: the same domain,
    or the same refusal, as getaddresses gives."""
    import email.utils

    def reference(text):
        addresses = [a for _, a in email.utils.getaddresses([text]) if a]
        if len(addresses) != 1:
            return "FromError"
        domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return "FromError"
        return domain if valid_domain(domain) else "FromError"

    from gateway.message.address import valid_domain

    message = parse(f"From: {text}\n")
    if not message.get_all("From"):
        return
    try:
        found = author_domain(message)
    except FromError:
        found = "FromError"
    assert found == reference(str(message.get_all("From")[0]))
