"""One-click unsubscribes through the gateway (RFC 8058; policy IV.C.4.b, IV.B.3 exception
process item 8): List-Unsubscribe rewritten for single-recipient mail, the /u/{token} endpoint
(valid, forged, expired and replayed tokens), forwarding to the vendor's own https endpoint (a
real aiohttp server on loopback), and the recorded opt-out applied to the next message."""

from __future__ import annotations

import asyncio
import email
import re
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.policy.flags import FlagKeys, Scope
from gateway.policy.optout_links import Link, LinkSealer
from tests.conftest import MESSAGE, free_port, send

FLAG_WORDS = re.compile(r"ferpa|do_not_email|do_not_contact|opt_out|unsubscribed", re.I)


@pytest.fixture(scope="module")
def vendor_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("vendor-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@dataclass
class Vendor:
    """The vendor's one-click endpoint: https on loopback, recording every POST."""

    port: int
    posts: list[tuple[str, bytes, str]] = field(default_factory=list)  # path, body, cookie
    status: int = 200

    @property
    def uri(self) -> str:
        return f"https://127.0.0.1:{self.port}/unsub/42?list=news"


@pytest.fixture
def vendor(vendor_cert):
    import ssl

    state = Vendor(free_port())

    async def handle(request: web.Request) -> web.Response:
        state.posts.append((request.path_qs, await request.read(),
                            request.headers.get("Cookie", "")))
        return web.Response(status=state.status, text="ok")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_post("/unsub/42", handle)
    runner = web.AppRunner(app)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, vendor_cert))

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", state.port, ssl_context=context).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield state
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def toml(vendor_cert, extra: str = "") -> str:
    return (f'[flags]\nunsubscribe_base_url = "https://unsub.example.edu/"\n'
            f'forward_ca_file = "{vendor_cert[0]}"\n{extra}')


def message(uri: str) -> bytes:
    return MESSAGE.replace(b"<https://em.acme.example/u/1>", f"<{uri}>".encode())


def relayed_links(received: bytes) -> tuple[list[str], list[str]]:
    parsed = email.message_from_bytes(received)
    return parsed.get_all("List-Unsubscribe"), parsed.get_all("List-Unsubscribe-Post")


def token_of(received: bytes) -> str:
    (value,), _ = relayed_links(received)
    return re.search(r"<https://unsub\.example\.edu/u/([A-Za-z0-9_-]+)>", value).group(1)


def post(gw, token: str, body: bytes = b"List-Unsubscribe=One-Click",
         content_type: str = "application/x-www-form-urlencoded") -> tuple[int, str]:
    request = urllib.request.Request(f"{gw.admin_url}/u/{token}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def opted_out(gw, address: str) -> list[str]:
    return gw.call(gw.gateway.flags.flags_of(address))


def test_single_recipient_link_rewritten_then_recorded_and_forwarded(gateways, sink, vendor,
                                                                   vendor_cert, logs):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    client, reply = send(gw, message=message(vendor.uri))
    assert reply[0] == 250
    links, posts = relayed_links(sink.messages[0].content)
    assert posts == ["List-Unsubscribe=One-Click"]
    (value,) = links
    token = token_of(sink.messages[0].content)
    assert value == (f"<https://unsub.example.edu/u/{token}>, "
                     "<mailto:unsub-1@em.acme.example>")
    assert b"alice" not in token.encode() and "127.0.0.1" not in value  # sealed, not signed
    assert post(gw, token) == (200, "You are unsubscribed.\n")
    assert vendor.posts == [("/unsub/42?list=news", b"List-Unsubscribe=One-Click", "")]
    assert opted_out(gw, "alice@example.edu") == ["unsubscribed/sender:acme"]
    records = gw.call(gw.gateway.flags.optout_records())
    assert [(r.address, r.scope, r.sender, r.organization, r.source) for r in records] == [
        ("alice@example.edu", Scope("sender", "acme"), "acme", "Acme Marketing Cloud",
         "unsubscribe")]
    assert gw.metric("gateway_unsubscribes_total", outcome="recorded") == 1
    assert gw.metric("gateway_unsubscribe_forwards_total", result="ok") == 1
    # the preference is honoured: acme's next promotional message does not reach alice
    send(gw, rcpts=("alice@example.edu", "bob@example.edu"), message=message(vendor.uri))
    assert sink.messages[1].rcpt_tos == ["bob@example.edu"]
    assert not FLAG_WORDS.search(logs.text())
    assert "alice@example.edu" not in logs.text()


def test_replayed_token_is_idempotent(gateways, sink, vendor, vendor_cert):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    token = token_of(sink.messages[0].content)
    for _ in range(3):
        assert post(gw, token) == (200, "You are unsubscribed.\n")
    assert len(vendor.posts) == 1  # forwarded once
    assert len(gw.call(gw.gateway.flags.optout_records())) == 1
    assert gw.metric("gateway_unsubscribes_total", outcome="replayed") == 2


def test_forged_tokens_opt_out_nobody(gateways, sink, vendor, vendor_cert):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    token = token_of(sink.messages[0].content)
    other_key = LinkSealer(FlagKeys(b"o" * 32), 60).seal(
        Link("bob@example.edu", "acme", vendor.uri, 2**40))
    tampered = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for forged in (tampered, token[:-4], "x" * 80, "not-base64!", other_key):
        assert post(gw, forged) == (404, "Unknown unsubscribe link.\n"), forged
    assert vendor.posts == []
    assert opted_out(gw, "alice@example.edu") == opted_out(gw, "bob@example.edu") == []
    assert gw.metric("gateway_unsubscribes_total", outcome="invalid") == 5


def test_expired_token(gateways, sink, vendor, vendor_cert):
    gw = gateways.start(toml(vendor_cert, "unsubscribe_days = 30\n"), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    token = token_of(sink.messages[0].content)
    gateways.clock.advance(30 * 86400 + 1)
    assert post(gw, token) == (410, "This unsubscribe link has expired.\n")
    assert vendor.posts == [] and opted_out(gw, "alice@example.edu") == []


def test_get_shows_a_form_and_records_nothing(gateways, sink, vendor, vendor_cert):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    token = token_of(sink.messages[0].content)
    with urllib.request.urlopen(f"{gw.admin_url}/u/{token}", timeout=30) as response:
        page = response.read().decode()
    assert f'action="/u/{token}"' in page and 'value="One-Click"' in page
    assert vendor.posts == [] and opted_out(gw, "alice@example.edu") == []
    assert post(gw, token, b"") == (400, "Expected List-Unsubscribe=One-Click (RFC 8058).\n")
    assert post(gw, token, b"List-Unsubscribe=Yes")[0] == 400
    # multipart/form-data is what some mail clients send (RFC 8058 3.2)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
            b"One-Click\r\n--b--\r\n")
    assert post(gw, token, body, "multipart/form-data; boundary=b")[0] == 200
    assert opted_out(gw, "alice@example.edu") == ["unsubscribed/sender:acme"]


def test_vendor_failure_is_retried_by_a_replay(gateways, sink, vendor, vendor_cert, logs):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    token = token_of(sink.messages[0].content)
    vendor.status = 500
    assert post(gw, token)[0] == 200  # recorded here whatever the vendor says
    assert opted_out(gw, "alice@example.edu") == ["unsubscribed/sender:acme"]
    assert gw.metric("gateway_unsubscribe_forwards_total", result="failed") == 1
    assert logs.events("unsubscribe_forward_failed")[0]["status"] == 500
    vendor.status = 200
    assert post(gw, token)[0] == 200
    assert post(gw, token)[0] == 200
    assert len(vendor.posts) == 2  # failed, retried (ok), then no more


def test_vendor_certificate_is_verified(gateways, sink, vendor, vendor_cert):
    gw = gateways.start('[flags]\nunsubscribe_base_url = "https://unsub.example.edu"\n',
                        upstream=sink.url)  # no forward_ca_file: the self-signed cert fails
    send(gw, message=message(vendor.uri))
    assert post(gw, token_of(sink.messages[0].content))[0] == 200
    assert vendor.posts == []
    assert gw.metric("gateway_unsubscribe_forwards_total", result="failed") == 1


@pytest.mark.parametrize("scope,expected", [
    ("organization", "unsubscribed/org:acme marketing cloud"),
    ("global", "unsubscribed")])
def test_scope(gateways, sink, vendor, vendor_cert, scope, expected):
    gw = gateways.start(toml(vendor_cert, f'unsubscribe_scope = "{scope}"\n'), upstream=sink.url)
    send(gw, message=message(vendor.uri))
    assert post(gw, token_of(sink.messages[0].content))[0] == 200
    assert opted_out(gw, "alice@example.edu") == [expected]


def test_only_single_recipient_mail_is_rewritten(gateways, sink, vendor, vendor_cert):
    gw = gateways.start(toml(vendor_cert), upstream=sink.url)
    gw.call(gw.gateway.flags.add("ferpa", [gw.gateway.flags.member("carol@example.edu")]))
    send(gw, rcpts=("alice@example.edu", "bob@example.edu"), message=message(vendor.uri))
    assert relayed_links(sink.messages[0].content)[0] == [
        f"<{vendor.uri}>, <mailto:unsub-1@em.acme.example>"]
    # one recipient left once the flagged one is dropped: rewritten, for that one
    send(gw, rcpts=("carol@example.edu", "bob@example.edu"), message=message(vendor.uri))
    assert sink.messages[1].rcpt_tos == ["bob@example.edu"]
    assert post(gw, token_of(sink.messages[1].content))[0] == 200
    assert opted_out(gw, "bob@example.edu") == ["unsubscribed/sender:acme"]


def test_off_by_default(gateways, sink, vendor):
    gw = gateways.start(upstream=sink.url)
    send(gw, message=message(vendor.uri))
    assert relayed_links(sink.messages[0].content)[0] == [
        f"<{vendor.uri}>, <mailto:unsub-1@em.acme.example>"]
