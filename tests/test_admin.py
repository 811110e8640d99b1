"""The admin listener: Prometheus metrics, health and readiness over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.conftest import send


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_move_with_traffic(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    client, _ = send(gw)
    client.mail("nobody@em.acme.example")
    client.quit()
    status, text = get(gw.admin_url + "/metrics")
    assert status == 200
    assert 'gateway_messages_total{decision="accept",reason="relayed",sender="acme"} 1.0' in text
    assert ('gateway_messages_total{decision="reject",reason="return_path_mismatch",sender="acme"} 1.0'
            in text)
    assert 'gateway_recipients_total{decision="accept",sender="acme"} 1.0' in text
    assert 'gateway_upstream_replies_total{class="2xx",stage="data"} 1.0' in text
    assert "gateway_relay_seconds_count 1.0" in text
    assert 'gateway_check_seconds_count{check="identity"} 2.0' in text
    assert "gateway_connections_total 1.0" in text


def test_active_sessions_gauge(gateways):
    gw = gateways.start()
    client = gw.smtp()
    assert gw.metric("gateway_sessions_active") == 1
    client.quit()
    gw.call(_settle())
    assert gw.metric("gateway_sessions_active") == 0


async def _settle():
    import asyncio

    await asyncio.sleep(0.05)


def test_healthz_and_readyz(gateways):
    gw = gateways.start()
    assert get(gw.admin_url + "/healthz") == (200, json.dumps({"status": "ok"}))
    status, body = get(gw.admin_url + "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    gw.call(gw.gateway.store.close())  # the state store goes away
    gw.gateway.store.ping = _broken
    status, body = get(gw.admin_url + "/readyz")
    assert status == 503 and json.loads(body)["problems"] == ["state: store closed"]


async def _broken():
    raise RuntimeError("store closed")
