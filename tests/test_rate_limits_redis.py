"""A cluster of gateways sharing one real redis-server: together they never let a sender exceed
its rate; when Redis goes away, [state] on_error decides, and they recover when it returns."""

from __future__ import annotations

import smtplib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from gateway.policy.rates import Rate
from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port, serve_process
from tests.test_rate_limits import WIDE, send_many, send_one



def start_process(directory: Path, redis_url: str, upstream: str) -> tuple[subprocess.Popen, int]:
    directory.mkdir(parents=True)
    (directory / "senders").mkdir()
    (directory / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    smtp, admin = free_port(), free_port()
    (directory / "gateway.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
[admin]
listen = "127.0.0.1:{admin}"
[upstream]
url = "{upstream}"
[state]
url = "{redis_url}"
[senders]
dir = "senders"
[logging]
level = "warning"
{WIDE}
[checks.sender_auth]
mode = "off"
""")
    return serve_process(directory / "gateway.toml", admin, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE), smtp


def send_to(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        code, _ = client.mail("bounce-1@em.acme.example")
        if code != 250:  # over the rate: refused at MAIL already
            return code
        client.rcpt("alice@example.edu")
        return client.data(MESSAGE)[0]


def test_three_gateway_processes_together_relay_no_more_than_the_rate(tmp_path, redis_server, sink):
    procs = [start_process(tmp_path / f"gw{i}", redis_server.url, sink.url) for i in range(3)]
    try:
        ports = [port for _, port in procs] * 30  # 90 messages spread over three gateways
        with ThreadPoolExecutor(45) as pool:
            codes = list(pool.map(send_to, ports))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(10)
    assert codes.count(250) == 30 and codes.count(451) == 60
    assert len(sink.messages) == 30


def test_redis_down_defers_then_recovers(gateways, redis_server, sink, logs):
    gw = gateways.start(WIDE + f'[state]\nurl = "{redis_server.url}"\n', upstream=sink.url)
    assert send_one(gw)[0] == 250
    redis_server.stop()
    assert send_one(gw) == (451, b"4.3.0 Temporary local problem; try again later")
    assert any(e["event"] == "state_unavailable" for e in logs.lines())
    redis_server.start()  # an empty Redis on the same port
    assert send_one(gw)[0] == 250
    assert len(sink.messages) == 2


def test_redis_down_with_local_fallback(gateways, redis_server, sink):
    gw = gateways.start(WIDE + f'[state]\nurl = "{redis_server.url}"\non_error = "local"\n',
                        upstream=sink.url)
    redis_server.stop()
    replies = send_many(gw, 35, workers=10)
    assert sum(r[0] == 250 for r in replies) == 30  # the per-process limit still holds
    assert gw.metric("gateway_state_fallbacks_total") >= 35
    redis_server.start()
    assert send_one(gw)[0] == 250  # Redis is back (and empty): shared limits again
    assert gw.metric("gateway_state_fallbacks_total") < 40


def test_throttle_through_redis_reaches_every_gateway(gateways, redis_server, sink):
    toml = WIDE + f'[state]\nurl = "{redis_server.url}"\n'
    first = gateways.start(toml, upstream=sink.url)
    second = gateways.start(toml, upstream=sink.url)
    first.call(first.gateway.throttles.set("acme", Rate(3, 60)))
    gateways.clock.advance(1)  # the other gateway re-reads throttles within a second
    codes = [send_one(second)[0] for _ in range(2)] + [send_one(first)[0] for _ in range(2)]
    assert codes == [250, 250, 250, 451]

