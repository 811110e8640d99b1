"""ARC sealing (RFC 8617) end to end: the gateway's seal on what it relays, verified at the
upstream with dkimpy's ``arc_verify`` against keys served by a real Knot DNS server (the
gateway's ARC key is published in the test zone); vendor ARC sets kept and chained, broken or
out-of-order ones sealed with ``cv=fail`` and relayed; ``gateway arc keygen``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import dkim
import dns.resolver
import pytest
from dkim.crypto import parse_pem_private_key

from gateway.message.arc import ArcKeyError, load_key
from gateway.ops.cli import main as cli
from tests.auth_helpers import auth_zones, example_records, key_record, message, rsa_key, sign
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, txt, zone_text
from tests.test_auth_smtp import config, deliver, header

pytestmark = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)

GW_KEY = ("arc", "seal")  # rsa_key(2048, "seal"): the gateway's, at arc._domainkey.gw-seal.example
VENDOR_KEY = ("varc", "vendor-arc")  # the vendor's ARC key, at varc._domainkey.acme.example
VENDOR_URI = "https://em.acme.example/unsub/42"


def zones() -> dict[str, str]:
    records = example_records() + [
        ("arc._domainkey.gw-seal", "TXT", txt(key_record(rsa_key(2048, "seal")[1]))),
        ("varc._domainkey.acme", "TXT", txt(key_record(rsa_key(2048, "vendor-arc")[1]))),
    ]
    return {**auth_zones(), "example": zone_text("example", records)}


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), zones())
    yield server
    server.stop()


@pytest.fixture
def dnsfunc(knot):
    """A synchronous TXT look-up against the test's Knot, as dkimpy's verifiers call it."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port = ["127.0.0.1"], knot.port

    def lookup(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        try:
            answer = res.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return lookup


@pytest.fixture
def start(gateways, sink, knot, tmp_path):
    from tests.auth_helpers import SENDER

    key = tmp_path / "arc.key"
    key.write_bytes(rsa_key(2048, "seal")[0])

    def run(seal: str = "changed", rewrite: bool = True, **settings):
        extra = (f'\n[arc]\ndomain = "gw-seal.example"\nselector = "arc"\nkey_file = "{key}"\n'
                 f'seal = "{seal}"\n')
        if rewrite:
            extra += '\n[flags]\nunsubscribe_base_url = "https://unsub.example.edu/"\n'
        return gateways.start(toml=config(knot.address, extra, **settings),
                              senders={"acme": SENDER}, upstream=sink.url)
    return run


def promo(**kw) -> bytes:
    return message(unsubscribe=f"<{VENDOR_URI}>, <mailto:unsub-1@pass.acme.example>",
                   extra=["List-Unsubscribe-Post: List-Unsubscribe=One-Click"], **kw)


def signed_promo() -> bytes:
    return sign(promo(), "rsa2048", "acme.example",
                include=["from", "to", "subject", "date", "message-id", "list-unsubscribe",
                         "list-unsubscribe-post"])


def vendor_sealed(raw: bytes) -> bytes:
    """``raw`` with the vendor's own ARC set (i=1) over its own Authentication-Results."""
    raw = b"Authentication-Results: mx.acme.example; arc=none\r\n" + raw
    fields = dkim.arc_sign(raw, b"varc", b"acme.example", rsa_key(2048, "vendor-arc")[0],
                           b"mx.acme.example", include_headers=[b"from", b"to", b"subject",
                                                                b"date", b"message-id"],
                           timestamp=1793631000)
    assert len(fields) == 3
    return b"".join(fields) + raw


def head_names(content: bytes) -> list[str]:
    head = content.partition(b"\r\n\r\n")[0].decode()
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in (" ", "\t")]


def seal_tags(content: bytes, instance: int) -> dict[str, str]:
    for value in header(content, "ARC-Seal"):
        tags = dict(t.strip().split("=", 1) for t in value.split(";") if "=" in t)
        if tags.get("i") == str(instance):
            return {k: re.sub(r"\s+", "", v) for k, v in tags.items()}
    raise AssertionError(f"no ARC-Seal i={instance}")


# --- sealing after the one-click unsubscribe rewrite -------------------------------------

def test_rewritten_message_is_sealed_and_the_seal_verifies(start, sink, dnsfunc):
    gw = start()
    raw = signed_promo()
    assert deliver(gw, raw) == (250, b"2.0.0 Ok: queued as SINK1")
    [msg] = sink.messages
    content = msg.content
    [links] = header(content, "List-Unsubscribe")
    assert links.startswith("<https://unsub.example.edu/u/")  # rewritten: the vendor's
    assert not dkim.verify(content, dnsfunc=dnsfunc)  # DKIM signature no longer verifies
    cv, results, reason = dkim.arc_verify(content, dnsfunc=dnsfunc)
    assert (cv, reason) == (b"pass", "success")
    assert [r["instance"] for r in results] == [1]
    # the ARC set on top, then the field that carries the chain status, then the relayed message
    assert head_names(content)[:5] == ["ARC-Seal", "ARC-Message-Signature",
                                       "ARC-Authentication-Results", "Authentication-Results",
                                       "Received"]
    assert seal_tags(content, 1)["cv"] == "none"
    assert seal_tags(content, 1)["d"] == "gw-seal.example"
    [aar] = header(content, "ARC-Authentication-Results")
    # every result the gateway found, carried over for campus mail (comments dropped by authres)
    assert aar.startswith("i=1; gw.test; arc=none; spf=pass smtp.mailfrom=pass.acme.example; "
                          "dkim=pass header.d=acme.example header.s=rsa2048 header.b=")
    assert aar.endswith('dmarc=none reason="no DMARC record at _dmarc.acme.example" '
                        "header.from=pass.acme.example; x-ecomm-alignment=pass "
                        "header.from=pass.acme.example")
    [ams] = header(content, "ARC-Message-Signature")
    assert "list-unsubscribe : list-unsubscribe-post" in ams
    assert gw.metric("gateway_auth_results_total", check="arc", result="none",
                     sender="acme") == 1


def test_unchanged_signed_message_is_not_sealed_by_default(start, sink):
    gw = start(rewrite=False)
    raw = signed_promo()
    assert deliver(gw, raw)[0] == 250
    content = sink.messages[0].content
    assert content.endswith(raw) and b"ARC-Seal" not in content


def test_removed_forged_results_count_as_a_change(start, sink, dnsfunc):
    gw = start(rewrite=False)
    raw = b"Authentication-Results: gw.test; dkim=pass header.d=acme.example\r\n" + \
        signed_promo()
    assert deliver(gw, raw)[0] == 250
    content = sink.messages[0].content
    assert b"gw.test; dkim=pass header.d=acme.example" not in content  # the forged one: gone
    assert dkim.arc_verify(content, dnsfunc=dnsfunc)[0] == b"pass"


def test_unsigned_message_is_sealed_when_configured_always(start, sink, dnsfunc):
    gw = start(seal="always", rewrite=False)
    raw = promo()
    assert deliver(gw, raw)[0] == 250
    content = sink.messages[0].content
    assert content.endswith(raw)
    assert dkim.arc_verify(content, dnsfunc=dnsfunc)[0] == b"pass"


def test_changed_unsigned_message_is_not_sealed_by_default(start, sink):
    gw = start()  # the rewrite happens, but no vendor signature was there to break
    assert deliver(gw, promo())[0] == 250
    content = sink.messages[0].content
    assert header(content, "List-Unsubscribe")[0].startswith("<https://unsub.example.edu/u/")
    assert b"ARC-Seal" not in content


# --- existing ARC sets --------------------------------------------------------------------

def test_vendor_arc_set_is_kept_and_chained(start, sink, dnsfunc):
    gw = start()
    raw = vendor_sealed(signed_promo())
    assert dkim.arc_verify(raw, dnsfunc=dnsfunc)[0] == b"pass"
    assert deliver(gw, raw)[0] == 250
    content = sink.messages[0].content
    assert content.endswith(raw.partition(b"\r\n\r\n")[2])
    assert seal_tags(content, 1)["d"] == "acme.example"  # the vendor's set, kept
    assert seal_tags(content, 2)["cv"] == "pass"
    assert seal_tags(content, 2)["d"] == "gw-seal.example"
    cv, results, _ = dkim.arc_verify(content, dnsfunc=dnsfunc)
    assert cv == b"pass" and [r["instance"] for r in results] == [2, 1]
    [ours] = [v for v in header(content, "ARC-Authentication-Results") if v.startswith("i=2")]
    assert ours.startswith("i=2; gw.test; arc=pass; spf=pass")


@pytest.mark.parametrize("name,damage", [
    ("tampered after sealing", lambda raw: raw.replace(b"Subject: Hello", b"Subject: Win!")),
    ("out of order (i=2 with no i=1)", lambda raw: re.sub(rb"\bi=1;", b"i=2;", raw)),
])
def test_broken_vendor_chain_is_sealed_cv_fail_and_relayed(start, sink, dnsfunc, logs, name,
                                                           damage):
    gw = start(seal="always", rewrite=False)
    raw = damage(vendor_sealed(promo()))
    assert dkim.arc_verify(raw, dnsfunc=dnsfunc)[0] == b"fail", name
    assert deliver(gw, raw) == (250, b"2.0.0 Ok: queued as SINK1"), name
    content = sink.messages[0].content
    assert content.endswith(raw.partition(b"\r\n\r\n")[2])
    instance = 2 if b"i=1;" in raw else 3
    tags = seal_tags(content, instance)
    assert (tags["cv"], tags["d"]) == ("fail", "gw-seal.example")
    assert header(content, "Authentication-Results")[0] == "gw.test; arc=fail"
    [line] = logs.events("arc_chain_failed")
    assert line["sender"] == "acme"
    assert gw.metric("gateway_auth_results_total", check="arc", result="fail",
                     sender="acme") == 1


# --- configuration and keygen -----------------------------------------------------------

def test_unusable_key_file_is_a_start_error(tmp_path):
    bad = tmp_path / "arc.key"
    bad.write_text("not a key\n")
    with pytest.raises(ArcKeyError, match="not an RSA private key"):
        load_key(bad)
    with pytest.raises(ArcKeyError, match="cannot read"):
        load_key(tmp_path / "missing.key")


def test_check_config_names_a_bad_arc_section(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text('[arc]\ndomain = "not a domain"\nselector = "arc"\n')
    assert cli(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "arc.domain" in err


def test_keygen_writes_the_key_and_prints_its_record(tmp_path, knot):
    path = tmp_path / "gateway.toml"
    path.write_text('[arc]\ndomain = "gw-seal.example"\nselector = "arc2"\n'
                    'key_file = "keys/arc.key"\n')
    run = [sys.executable, "-m", "gateway", "arc", "keygen", "--config", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    key_file = tmp_path / "keys" / "arc.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    parse_pem_private_key(key_file.read_bytes())
    record = done.stdout.strip()
    m = re.fullmatch(r'arc2\._domainkey\.gw-seal\.example\. IN TXT \( (.+) \)', record)
    assert m, record
    value = "".join(re.findall(r'"([^"]*)"', m.group(1)))
    assert value.startswith("v=DKIM1; k=rsa; p=")
    # the printed record verifies what the written key signs
    signed = dkim.sign(message(), b"arc2", b"gw-seal.example", key_file.read_bytes())
    assert dkim.verify(signed + message(), dnsfunc=lambda name, timeout=5: value.encode())
    [event] = [json.loads(line) for line in
               (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
    assert (event["action"], event["selector"], event["replaced"]) == ("arc_keygen", "arc2",
                                                                       False)
    assert event["actor"].startswith("os:")
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists; --force replaces it" in again.stderr
    assert subprocess.run(run + ["--force"], capture_output=True, text=True,
                          timeout=60).returncode == 0


def test_missing_key_file_stops_the_start_naming_the_key(gateways, sink):
    from gateway.infra.typed import ConfigError

    with pytest.raises(ConfigError, match=r"gateway\.toml: arc\.key_file: .*nope\.key: cannot "
                                          r"read"):
        gateways.start('[arc]\ndomain = "gw-seal.example"\nselector = "arc"\n'
                       'key_file = "nope.key"\n', upstream=sink.url)
