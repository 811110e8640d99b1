"""The status page (/status on the admin listener) in a real headless Chromium (Debian package
chromium): it renders after real traffic, a screenshot is written, its links lead to the
decisions they name, the token is required, and what clients chose is escaped."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SENDER, MESSAGE, send

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(.ci/run installs the Debian package chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SENDER = EXAMPLE_SENDER.replace('"Acme Marketing Cloud"', '"Acme <b>Marketing</b> & Co"')
SCRIPT = "<script>alert(1)</script>"


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href"]


def traffic(gw) -> None:
    client, reply = send(gw)  # relayed
    assert reply[0] == 250
    assert client.mail("nobody@em.acme.example")[0] == 550  # return-path: refused at MAIL
    client.rset()
    large = MESSAGE.replace(b"Subject: Hello\r\n", b"Subject: Hello\r\nX-Campaign-ID: "
                            + SCRIPT.encode() + b"\r\nX-Audience-Size: 20000\r\n")
    client.mail("bounce-2@em.acme.example")
    client.rcpt("bob@example.edu")
    code, _ = client.data(large)  # business hours (the tests' clock): deferred
    assert code == 451
    client.quit()
    request = urllib.request.Request(
        gw.admin_url + "/api/throttles/acme", method="PUT",
        data=json.dumps({"rate": "10/minute", "for": "2h"}).encode(),
        headers={"Authorization": f"Bearer {gw.gateway.admin_token}"})
    urllib.request.urlopen(request, timeout=10).close()


def test_the_token_is_required(gateways):
    gw = gateways.start()
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
                    {"Authorization": "Bearer wrong"}):
        request = urllib.request.Request(gw.admin_url + "/status", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 401
        assert err.value.headers["WWW-Authenticate"].startswith('Basic realm="ecomm-gateway')
    ok = urllib.request.Request(gw.admin_url + "/status", headers={
        "Authorization": "Basic " + base64.b64encode(
            f"anyone:{gw.gateway.admin_token}".encode()).decode()})
    with urllib.request.urlopen(ok, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "<script" not in r.read().decode().lower()
    post = urllib.request.Request(gw.admin_url + "/status", method="POST", data=b"", headers={
        "Authorization": f"Bearer {gw.gateway.admin_token}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # read-only
        urllib.request.urlopen(post, timeout=10)
    assert err.value.code == 405


@needs_chromium
def test_status_page_in_chromium(gateways, sink, tmp_path):
    gw = gateways.start(upstream=sink.url, senders={"acme": SENDER})
    traffic(gw)
    token = gw.gateway.admin_token
    host, port = gw.gateway.admin_address
    base = f"http://admin:{token}@{host}:{port}"
    shown = chromium(tmp_path, base + "/status", "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    assert "<h1>ecomm-gateway status</h1>" in dom
    assert "Acme &lt;b&gt;Marketing&lt;/b&gt; &amp; Co" in dom  # escaped, not markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom
    assert 'id="sender-acme"' in dom
    assert "relayed 1 <small>(relayed 1)</small>" in dom
    assert "refused 1 <small>(return_path_mismatch 1)</small>" in dom
    assert "deferred 1 <small>(large_audience 1)</small>" in dom
    assert "1 of 10/minute (throttle)" in dom and "throttled to 10/minute" in dom
    assert "X-Campaign-ID &lt;script&gt;alert(1)&lt;/script&gt;: 20000 &gt; 15000" in dom
    assert "0 message(s) held" in dom and "generation 0" in dom
    # a screenshot, written where the run keeps its artifacts
    out = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    png = out / "status-page.png"
    shot = chromium(tmp_path, base + "/status", f"--screenshot={png}", "--window-size=1280,1000")
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1000)
    # every link works: each refusal's leads to its decision
    links = Links()
    links.feed(dom)
    traces = [h for h in links.hrefs if h.startswith("/status/trace?queue_id=")]
    assert len(traces) == 2
    reasons = set()
    for href in traces:
        page = chromium(tmp_path, base + href, "--dump-dom")
        assert page.returncode == 0
        queue_id = href.rpartition("=")[2]
        assert f"<h1>Decision {queue_id}</h1>" in page.stdout
        reasons |= {r for r in ("return_path_mismatch", "large_audience") if r in page.stdout}
        back = Links()
        back.feed(page.stdout)
        assert back.hrefs == ["/status"]
    assert reasons == {"return_path_mismatch", "large_audience"}
