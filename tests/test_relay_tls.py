"""TLS towards campus mail: STARTTLS opportunistic / required / off, and smtps://, with the
upstream's certificate verified unless configured otherwise."""

from __future__ import annotations

import pytest

from tests.conftest import Sink, send


@pytest.fixture
def tls_sink(tls_files):
    s = Sink(starttls=tls_files)
    yield s
    s.stop()


def upstream(url: str, **keys: str) -> str:
    return "[upstream]\n" + f'url = "{url}"\n' + "".join(f"{k} = {v}\n" for k, v in keys.items())


def test_opportunistic_starttls_used_when_offered(gateways, tls_sink):
    gw = gateways.start(upstream(tls_sink.url, tls_verify="false"))
    client, (code, _) = send(gw)
    client.quit()
    assert code == 250 and len(tls_sink.messages) == 1
    assert tls_sink.handler.tls_seen == [False, True]  # EHLO, STARTTLS, EHLO again


def test_starttls_with_certificate_verified_against_ca_file(gateways, tls_sink, tls_files):
    cert, _ = tls_files
    # the test certificate names gw.test, not 127.0.0.1: verification must refuse it
    gw = gateways.start(upstream(tls_sink.url, ca_file=f'"{cert}"'))
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        451, b"4.4.1 Campus mail is unavailable; try again later")
    client.quit()
    assert tls_sink.messages == []


def test_required_starttls_refuses_an_upstream_without_it(gateways, sink):
    gw = gateways.start(upstream(sink.url, starttls='"required"'))
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example")[0] == 451
    client.quit()
    assert sink.handler.tls_seen == [False]


def test_starttls_off_stays_plain(gateways, tls_sink):
    gw = gateways.start(upstream(tls_sink.url, starttls='"off"'))
    client, (code, _) = send(gw)
    client.quit()
    assert code == 250 and tls_sink.handler.tls_seen == [False]


def test_smtps_upstream(gateways, tls_files):
    s = Sink(implicit_tls=tls_files)
    try:
        gw = gateways.start(upstream(s.url, tls_verify="false"))
        client, (code, text) = send(gw)
        client.quit()
        assert (code, text) == (250, b"2.0.0 Ok: queued as SINK1")
        assert s.handler.data_tls
    finally:
        s.stop()
