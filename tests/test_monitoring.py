"""What ops watch: build info, upstream probes and readiness, state store health, quarantine
size, registration expiry, base units and one vocabulary of decisions; `promtool check metrics`
on a live gateway's /metrics after accepted, refused and deferred traffic."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from gateway.ops.metrics import DECISIONS
from gateway.ops.monitor import version
from gateway.policy.quarantine import Item
from tests.conftest import MESSAGE, Sink, send


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def traffic(gw, sink) -> None:
    """One message accepted, one refused at DATA, one refused at RCPT, one deferred by campus
    mail (451), as vendors would send them."""
    client, reply = send(gw)
    assert reply[0] == 250
    client.quit()
    no_unsub = MESSAGE.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"") \
        .replace(b"List-Unsubscribe: <https://em.acme.example/u/1>, "
                 b"<mailto:unsub-1@em.acme.example>\r\n", b"")
    client, reply = send(gw, message=no_unsub)
    assert reply[0] == 550
    client.quit()
    client, reply = send(gw, rcpts=("someone@gmail.com",))
    assert reply[0] == 550
    client.quit()
    sink.handler.data_reply = "451 4.3.0 Try later"
    client, reply = send(gw)
    assert reply[0] == 451
    client.quit()
    sink.handler.data_reply = None


def probing(sink_url: str, extra: str = "") -> str:
    return (f'[upstream]\nurl = "{sink_url}"\nprobe = true\ntimeout = 1.0\npool_wait = 1.0\n'
            'unreachable_grace = 60\n' + extra)


def test_build_info_and_registration_expiry(gateways):
    gw = gateways.start()
    assert gw.metric("gateway_build_info", version=version()) == 1
    assert version() == "0.1.0"
    end = dt.datetime(2027, 7, 1, tzinfo=dt.timezone.utc).timestamp()  # expires = 2027-06-30
    assert gw.metric("gateway_sender_registration_expiry_timestamp_seconds", sender="acme") == end


def test_upstream_probe_and_readiness_grace(gateways):
    sink = Sink()  # stopped by the test itself
    gw = gateways.start(probing(sink.url))
    host = f"127.0.0.1:{sink.port}"
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_upstream_up", host=host) == 1
    assert sink.handler.ehlos >= 1  # a real EHLO, then QUIT
    assert sink.messages == []
    sink.stop()  # campus mail goes away
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_upstream_up", host=host) == 0
    assert get(gw.admin_url + "/readyz")[0] == 200  # within the grace
    gateways.clock.advance(61)
    gw.call(gw.gateway.monitor.tick())
    status, body = get(gw.admin_url + "/readyz")
    assert status == 503
    problems = json.loads(body)["problems"]
    assert len(problems) == 1 and problems[0].startswith(
        f"upstream: campus mail unreachable for 61 s ({host}: ")
    assert get(gw.admin_url + "/healthz") == (200, json.dumps({"status": "ok"}))  # liveness


def test_one_host_up_is_enough_for_readiness(gateways, sink):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens: connection refused
    gw = gateways.start(probing(sink.url, f'hosts = ["smtp://127.0.0.1:{dead_port}"]\n'))
    gw.call(gw.gateway.monitor.tick())
    gateways.clock.advance(120)
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_upstream_up", host=f"127.0.0.1:{sink.port}") == 1
    assert gw.metric("gateway_upstream_up", host=f"127.0.0.1:{dead_port}") == 0
    assert get(gw.admin_url + "/readyz")[0] == 200


def test_probe_of_a_silent_host_is_bounded(gateways):
    """A host that accepts the connection and never says anything: down after the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    try:
        gw = gateways.start(probing(f"smtp://127.0.0.1:{port}"))
        gw.call(gw.gateway.monitor.tick(), timeout=10)
        assert gw.metric("gateway_upstream_up", host=f"127.0.0.1:{port}") == 0
    finally:
        silent.close()


def test_maildir_probe_state_and_quarantine_size(gateways):
    gw = gateways.start()
    monitor = gw.gateway.monitor
    monitor.probe = True
    gw.call(monitor.tick())
    assert gw.metric("gateway_upstream_up", host="maildir") == 1
    assert gw.metric("gateway_state_up") == 1
    assert gw.metric("gateway_quarantine_messages") == 0
    for n in range(2):
        item = Item(id=f"Q{n}", stored_at="2026-11-02T15:00:00+00:00", mail_from="b@x",
                    recipients=["alice@example.edu"], sender="acme", client_ip="127.0.0.1",
                    helo="c", reason="sender_auth", detail="")
        gw.call(gw.gateway.quarantine.store(item, MESSAGE))
    gw.call(monitor.tick())
    assert gw.metric("gateway_quarantine_messages") == 2
    gw.gateway.quarantine.delete("Q0")
    gw.call(monitor.tick())
    assert gw.metric("gateway_quarantine_messages") == 1


def test_state_store_down_makes_readyz_503(gateways):
    gw = gateways.start()

    async def broken():
        raise ConnectionError("connection refused")

    gw.gateway.store.ping = broken
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_state_up") == 0
    status, body = get(gw.admin_url + "/readyz")
    assert status == 503 and json.loads(body)["problems"] == ["state: connection refused"]


def test_decisions_one_vocabulary_and_rates_per_second(gateways, sink):
    gw = gateways.start("[limits]\nglobal_rate = \"120/minute\"\nadaptive = true\n",
                        upstream=sink.url)
    assert gw.metric("gateway_adaptive_rate_per_second") == pytest.approx(2.0)  # 120/minute
    traffic(gw, sink)
    body = get(gw.admin_url + "/metrics")[1]
    decisions = set()
    for line in body.splitlines():
        if line.startswith(("gateway_messages_total{", "gateway_recipients_total{",
                            "gateway_message_classes_total{")):
            if float(line.rsplit(" ", 1)[1]) > 0:  # known label values start at 0
                decisions.add(line.split('decision="')[1].split('"')[0])
    assert decisions == {"accept", "reject", "defer"}
    assert decisions <= set(DECISIONS)
    assert gw.metric("gateway_recipients_total", sender="acme", decision="reject") == 2
    assert gw.metric("gateway_adaptive_rate_per_second") == pytest.approx(1.0)  # halved on 451
    assert gw.metric("gateway_rate_effective_per_second", sender="acme") == pytest.approx(0.5)
    assert "per_minute" not in body


def test_promtool_check_metrics_on_a_live_gateway(gateways, sink):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs prometheus)")
    gw = gateways.start(probing(sink.url, "") + "[limits]\nadaptive = true\n"
                        "global_rate = \"120/minute\"\n")
    gw.call(gw.gateway.monitor.tick())
    traffic(gw, sink)
    body = get(gw.admin_url + "/metrics")[1]
    for name in ("gateway_build_info", "gateway_upstream_up", "gateway_quarantine_messages",
                 "gateway_sender_registration_expiry_timestamp_seconds", "gateway_state_up"):
        assert f"\n{name}{{" in body or f"\n{name} " in body, name
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", \
        proc.stdout + proc.stderr


def test_state_errors_and_dns_failures_counted(gateways, sink):
    from gateway.state import StoreError

    gw = gateways.start(upstream=sink.url)
    for outcome in ("timeout", "servfail", "error"):  # present from the start, at 0
        assert gw.gateway.metrics_registry.get_sample_value(
            "gateway_dns_failures_total", {"outcome": outcome}) == 0
    assert gw.gateway.metrics_registry.get_sample_value("gateway_state_errors_total") == 0

    async def down(*args, **kwargs):
        raise StoreError("connection refused")

    gw.gateway.store.acquire = down
    client, reply = send(gw)
    client.quit()
    assert reply[0] == 451 and sink.messages == []
    assert gw.metric("gateway_state_errors_total") == 1


async def test_dns_timeout_counts_as_a_failure():
    """A nameserver that never answers (a bound UDP socket): the query times out and counts."""
    from prometheus_client import CollectorRegistry

    from gateway.infra.clock import SystemClock
    from gateway.infra.dns import DnsTempError, Resolver
    from gateway.ops.metrics import Metrics

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    metrics = Metrics(CollectorRegistry())
    resolver = Resolver(clock=SystemClock(), nameservers=(f"127.0.0.1:{silent.getsockname()[1]}",),
                        timeout=0.3, metrics=metrics)
    try:
        with pytest.raises(DnsTempError):
            await resolver.query("em.acme.example", "TXT")
    finally:
        await resolver.close()
        silent.close()
    assert metrics.registry.get_sample_value("gateway_dns_failures_total",
                                             {"outcome": "timeout"}) == 1
    assert metrics.registry.get_sample_value("gateway_dns_cache_lookups_total",
                                             {"outcome": "miss"}) == 1


def test_ops_keys_documented_with_their_defaults():
    """The keys this part added are in the shipped gateway.toml, with their defaults."""
    import re
    from pathlib import Path

    from gateway.infra.config import AdminConfig, LoggingConfig, UpstreamConfig, load_config

    shipped = Path(__file__).resolve().parent.parent / "gateway.toml"
    config = load_config(shipped)
    assert config.upstream == UpstreamConfig() and config.logging == LoggingConfig()
    assert config.admin == AdminConfig()
    text = shipped.read_text()
    for section, keys in {"upstream": ["probe = true", "unreachable_grace = 60.0"],
                          "admin": ["watch_interval = 15.0", "# token_dir = "],
                          "logging": ["# file = ", 'audit_file = "var/audit.jsonl"']}.items():
        body = re.search(rf"^\[{section}\]\n(.*?)(?=^\[)", text, re.M | re.S).group(1)
        for key in keys:
            assert re.search(rf"^{re.escape(key)}", body, re.M), (section, key)


def test_registration_expiry_follows_a_reload(gateways):
    from tests.test_reload import reload

    gw = gateways.start()
    senders = gateways.tmp_path / "gw" / "senders"
    (senders / "events.toml").write_text(
        (senders / "acme.toml").read_text().replace('"acme"', '"events"')
        .replace("acme", "events").replace("2027-06-30", "2027-01-15"))
    (senders / "acme.toml").unlink()
    assert reload(gw)[0] == 200
    end = dt.datetime(2027, 1, 16, tzinfo=dt.timezone.utc).timestamp()
    assert gw.metric("gateway_sender_registration_expiry_timestamp_seconds", sender="events") == end
    assert gw.gateway.metrics_registry.get_sample_value(
        "gateway_sender_registration_expiry_timestamp_seconds", {"sender": "acme"}) is None
