"""ARC sealing behind a real Postfix (the milter front): the gateway's ARC fields are inserted by
Postfix under its own Received field, and the message as Postfix relays it verifies with
dkimpy's ``arc_verify`` after the one-click unsubscribe rewrite broke the vendor's DKIM
signature. Keys are served by a real Knot DNS server."""

from __future__ import annotations

import re

import dkim
import pytest

from tests.auth_helpers import SENDER
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer
from tests.test_arc import dnsfunc, signed_promo, zones  # noqa: F401 (fixture)
from tests.test_milter_postfix import (delivered, header, milter_port, mta,  # noqa: F401
                                       postfix, relay_sink, start, swaks)

pytestmark = [pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)]


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), zones())
    yield server
    server.stop()


def test_postfix_relays_a_message_whose_seal_verifies(start, mta, relay_sink, knot, tmp_path,
                                                      dnsfunc):  # noqa: F811
    from tests.auth_helpers import rsa_key

    key = tmp_path / "arc.key"
    key.write_bytes(rsa_key(2048, "seal")[0])
    start(f'[dns]\nnameservers = ["{knot.address}"]\ntimeout = 2.0\n'
          '[checks.sender_auth]\nmode = "enforce"\ncheck_helo = false\n'
          '[flags]\nunsubscribe_base_url = "https://unsub.example.edu"\n'
          f'[arc]\ndomain = "gw-seal.example"\nselector = "arc"\nkey_file = "{key}"\n',
          senders={"acme": SENDER})
    replies = swaks(mta, tmp_path, frm="bounce-1@pass.acme.example", data=signed_promo())
    assert replies["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    content = msg.content
    names = [f.split(b":", 1)[0] for f in
             re.sub(rb"\r\n[ \t]+", b" ", content.partition(b"\r\n\r\n")[0]).split(b"\r\n")]
    assert names[:5] == [b"Received", b"ARC-Seal", b"ARC-Message-Signature",
                         b"ARC-Authentication-Results", b"Authentication-Results"]
    assert b"https://unsub.example.edu/u/" in content
    assert not dkim.verify(content, dnsfunc=dnsfunc)  # the vendor's signature broke
    cv, _, reason = dkim.arc_verify(content, dnsfunc=dnsfunc)
    assert (cv, reason) == (b"pass", "success")
    # computed over the fields the gateway had Postfix insert: the rewritten link, its results
    [ams] = header(content, "ARC-Message-Signature")
    assert "list-unsubscribe : list-unsubscribe-post" in ams
    [aar] = header(content, "ARC-Authentication-Results")
    assert aar.startswith("i=1; gw.test; arc=none; spf=pass smtp.mailfrom=pass.acme.example; "
                          "dkim=pass header.d=acme.example")
