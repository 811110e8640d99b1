"""Per-sender and gateway-wide rate limits, pacing then deferral, run-time throttles, session
caps and persistence, with the injectable clock: no test sleeps to reach a minute boundary."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port

ROOT = Path(__file__).resolve().parent.parent
WIDE = "[limits]\nsessions_per_sender = 200\nsessions_per_ip = 200\n"


def send_one(gw, mail_from="bounce-1@em.acme.example", rcpt="alice@example.edu"):
    """The reply that ended the transaction: MAIL's when it refused (a sender over its rate is
    refused there), else the reply to the final dot."""
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
        client.ehlo("client.test")
        reply = client.mail(mail_from)
        if reply[0] != 250:
            return reply
        client.rcpt(rcpt)
        return client.data(MESSAGE)


def send_many(gw, n: int, workers: int = 100):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: send_one(gw), range(n)))


class Timed:
    """Records the (fake) time at which the upstream received each message."""

    def __init__(self, sink, clock):
        self.times: list[float] = []
        original = sink.handler.handle_DATA

        async def handle_DATA(server, session, envelope):
            self.times.append(clock.now().timestamp())
            return await original(server, session, envelope)

        sink.handler.handle_DATA = handle_DATA

    def max_in_any_window(self, window: float = 60.0) -> int:
        times = sorted(self.times)
        return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


def test_100_concurrent_messages_at_30_per_minute(gateways, sink):
    timed = Timed(sink, gateways.clock)
    gw = gateways.start(WIDE, upstream=sink.url)
    replies = send_many(gw, 100)
    accepted = [r for r in replies if r[0] == 250]
    deferred = [r for r in replies if r[0] == 451]
    assert len(accepted) == 30 and len(sink.messages) == 30
    assert len(deferred) == 70
    assert set(deferred) == {(451, b"4.7.1 Sending rate of sender acme is limited to 30/minute; "
                                   b"retry in 60 s")}
    # the vendor retries: half a minute later the window is still full ...
    gateways.clock.advance(30)
    assert send_one(gw) == (451, b"4.7.1 Sending rate of sender acme is limited to 30/minute; "
                                 b"retry in 30 s")
    # ... a minute later it has room for thirty more, and no 60 s window ever held more than 30
    gateways.clock.advance(30)
    replies = send_many(gw, 40)
    assert sum(1 for r in replies if r[0] == 250) == 30
    assert len(sink.messages) == 60
    assert timed.max_in_any_window() == 30
    assert gw.metric("gateway_rate_deferrals_total", sender="acme", limit="sender") == 81
    assert gw.metric("gateway_rate_budget_used", sender="acme") == 30


def test_sliding_window_not_calendar_minutes(gateways, sink):
    timed = Timed(sink, gateways.clock)
    gw = gateways.start(WIDE, upstream=sink.url)
    gateways.clock.advance(45)  # 15:00:45: late in a calendar minute
    assert sum(r[0] == 250 for r in send_many(gw, 30)) == 30
    gateways.clock.advance(20)  # 15:01:05: a new calendar minute, but the same sliding window
    assert send_one(gw)[0] == 451
    gateways.clock.advance(40)  # 15:01:45: the first thirty have left the window
    assert sum(r[0] == 250 for r in send_many(gw, 31)) == 30
    assert timed.max_in_any_window() == 30


def test_over_the_limit_the_reply_is_held_until_budget_frees(gateways, sink):
    gw = gateways.start(WIDE, upstream=sink.url)
    assert sum(r[0] == 250 for r in send_many(gw, 30)) == 30
    gateways.clock.advance(55)  # capacity frees in 5 s: within max_hold (10 s), so hold
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(send_one, gw)
        deadline = time.monotonic() + 10
        while gateways.clock.sleeping == 0:
            assert time.monotonic() < deadline, "the message was not held"
            time.sleep(0.01)
        assert len(sink.messages) == 30  # held: not yet relayed, no reply yet
        assert not pending.done()
        gateways.clock.advance(5)
        assert pending.result(10) == (250, b"2.0.0 Ok: queued as SINK31")
    assert gw.metric("gateway_rate_holds_total", sender="acme") == 1


def test_sender_registered_rate_is_lower_and_higher_is_refused(gateways, sink, tmp_path):
    gw = gateways.start(WIDE, senders={"acme": EXAMPLE_SENDER + 'rate = "5/minute"\n'},
                        upstream=sink.url)
    replies = send_many(gw, 8)
    assert sum(r[0] == 250 for r in replies) == 5
    assert (451, b"4.7.1 Sending rate of sender acme is limited to 5/minute; retry in 60 s") in replies
    from gateway.infra.config import load_config
    from gateway.policy.senders import load_registry
    from gateway.infra.typed import ConfigError

    path = gateways.write(WIDE, senders={"acme": EXAMPLE_SENDER + 'rate = "31/minute"\n'})
    config = load_config(path)
    with pytest.raises(ConfigError) as err:
        load_registry(config.path(config.senders.dir), config.checks, config.limits.ceiling)
    assert err.value.key == "rate"
    assert err.value.reason == "31/minute exceeds the policy ceiling [limits] sender_rate = 30/minute"


def test_global_rate_limits_all_senders_together(gateways, sink):
    other = (EXAMPLE_SENDER.replace('"acme"', '"beta"').replace("bounce-*@em.acme.example", "b-*@em.beta.example")
             .replace('["em.acme.example"]', '["em.beta.example"]'))
    gw = gateways.start(WIDE + 'global_rate = "40/minute"\n',
                        senders={"acme": EXAMPLE_SENDER, "beta": other}, upstream=sink.url)
    assert sum(r[0] == 250 for r in send_many(gw, 30)) == 30
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: send_one(gw, "b-1@em.beta.example"), range(20)))
    assert sum(r[0] == 250 for r in replies) == 10
    assert (451, b"4.7.1 Gateway-wide sending rate is limited to 40/minute to protect campus "
                 b"mail; retry in 60 s") in replies


def test_rejected_messages_do_not_spend_budget(gateways, sink):
    gw = gateways.start(WIDE, upstream=sink.url)
    no_unsubscribe = b"".join(line for line in MESSAGE.splitlines(keepends=True)
                              if not line.startswith(b"List-Unsubscribe"))
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.ehlo("client.test")
        for _ in range(40):  # refused at DATA by a content check, before the rate limit
            client.mail("bounce-1@em.acme.example")
            client.rcpt("alice@example.edu")
            assert client.data(no_unsubscribe)[0] == 550
    assert sum(r[0] == 250 for r in send_many(gw, 31)) == 30


def test_session_caps_per_ip_and_per_sender(gateways):
    gw = gateways.start("[limits]\nsessions_per_ip = 2\nsessions_per_sender = 1\n")
    first, second = gw.smtp(), gw.smtp()
    third = smtplib.SMTP(timeout=10)
    code, text = third.connect("127.0.0.1", gw.port)
    assert (code, text) == (421, b"4.7.0 Too many sessions from [127.0.0.1] (at most 2); try again later")
    assert first.mail("bounce-1@em.acme.example")[0] == 250
    assert second.mail("bounce-2@em.acme.example") == (
        421, b"4.7.0 Too many concurrent sessions for sender acme (at most 1); try again later")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        second.noop()
    first.quit()
    assert gw.metric("gateway_sessions_refused_total", cap="ip") == 1
    assert gw.metric("gateway_sessions_refused_total", cap="sender") == 1


def test_sqlite_budget_survives_restart(gateways, sink):
    toml = WIDE + '[state]\nurl = "sqlite:var/state.sqlite3"\n'
    gw = gateways.start(toml, upstream=sink.url)
    assert sum(r[0] == 250 for r in send_many(gw, 30)) == 30
    gw.stop()
    gateways.running.remove(gw)
    gateways.clock.advance(10)
    again = gateways.start(toml, upstream=sink.url)
    assert send_one(again) == (451, b"4.7.1 Sending rate of sender acme is limited to 30/minute; "
                                    b"retry in 50 s")


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_throttle_set_list_clear_through_cli_takes_effect_on_next_message(gateways, sink):
    admin = free_port()
    toml = WIDE + f'[admin]\nlisten = "127.0.0.1:{admin}"\n[state]\nurl = "sqlite:var/state.sqlite3"\n'
    gw = gateways.start(toml, upstream=sink.url)
    config = gateways.tmp_path / "gw" / "gateway.toml"
    out = cli(config, "throttle", "set", "acme", "2/minute", "--for", "2h")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "throttled acme to 2/minute until 2026-11-02 17:00:00 UTC\n"
    listing = cli(config, "throttle", "list")
    assert listing.stdout.split() == ["acme", "2/minute", "2026-11-02", "17:00:00", "UTC"]
    replies = send_many(gw, 4)
    assert sum(r[0] == 250 for r in replies) == 2
    assert (451, b"4.7.1 Sending rate of sender acme is limited to 2/minute; retry in 60 s") in replies
    # it survives a restart (SQLite)
    gw.stop()
    gateways.running.remove(gw)
    gw = gateways.start(toml, upstream=sink.url)
    assert send_one(gw)[0] == 451
    assert cli(config, "throttle", "clear", "acme").stdout == "cleared the throttle of acme\n"
    assert send_one(gw)[0] == 250  # back to 30/minute at once
    assert cli(config, "throttle", "list").stdout == "no throttles\n"
    bad = cli(config, "throttle", "set", "nobody", "1/minute")
    assert bad.returncode != 0 and "no sender 'nobody'" in bad.stderr
    faster = cli(config, "throttle", "set", "acme", "fast")
    assert faster.returncode == 2 and "is not a rate such as" in faster.stderr


def test_throttle_expires(gateways, sink):
    admin = free_port()
    gw = gateways.start(WIDE + f'[admin]\nlisten = "127.0.0.1:{admin}"\n', upstream=sink.url)
    config = gateways.tmp_path / "gw" / "gateway.toml"
    assert cli(config, "throttle", "set", "global", "1/minute", "--for", "90s").returncode == 0
    assert [r[0] for r in send_many(gw, 2, workers=1)] == [250, 451]
    gateways.clock.advance(91)
    assert [r[0] for r in send_many(gw, 5, workers=1)] == [250] * 5


def test_admin_api_needs_the_token(gateways):
    gw = gateways.start()
    request = urllib.request.Request(gw.admin_url + "/api/throttles")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 401
    request.add_header("Authorization", "Bearer wrong")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 401
    token = (gateways.tmp_path / "gw" / "var" / "admin.token").read_text()
    assert oct((gateways.tmp_path / "gw" / "var" / "admin.token").stat().st_mode & 0o777) == "0o600"
    request = urllib.request.Request(gw.admin_url + "/api/throttles",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read()) == {"throttles": []}


def test_adaptive_rate_steps_down_on_421_and_recovers(gateways, sink, logs):
    gw = gateways.start(WIDE + 'global_rate = "100/minute"\nadaptive = true\n'
                        'adaptive_interval = 10.0\nadaptive_increase = 0.1\n', upstream=sink.url)
    assert gw.metric("gateway_adaptive_rate_per_second") * 60 == pytest.approx(100)
    sink.handler.data_reply = "421 4.3.2 System overloaded, slow down"
    assert send_one(gw) == (421, b"4.3.2 System overloaded, slow down")
    assert gw.metric("gateway_adaptive_rate_per_second") * 60 == pytest.approx(50)
    assert send_one(gw)[0] == 421  # within the interval: one signal, one step
    assert gw.metric("gateway_adaptive_rate_per_second") * 60 == pytest.approx(50)
    gateways.clock.advance(10)
    assert send_one(gw)[0] == 421
    assert gw.metric("gateway_adaptive_rate_per_second") * 60 == pytest.approx(30)  # the floor (30/minute)
    sink.handler.data_reply = None
    gateways.clock.advance(60)
    for expected in (40, 40, 50):
        assert send_one(gw)[0] == 250
        assert gw.metric("gateway_adaptive_rate_per_second") * 60 == pytest.approx(expected)
        gateways.clock.advance(5)  # additive increase: one step per 10 s of health
    steps = [e for e in logs.events("adaptive_rate")]
    assert [e["reason"] for e in steps][:2] == ["upstream_4xx", "upstream_4xx"]
    assert [e["rate"] for e in steps] == ["50/minute", "30/minute", "40/minute", "50/minute"]


def test_recipients_per_minute_limit(gateways, sink):
    gw = gateways.start(WIDE + 'recipient_rate = "50/minute"\n',
                        senders={"acme": EXAMPLE_SENDER + 'recipient_rate = "40/minute"\n'},
                        upstream=sink.url)

    def to(n: int):
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
            return client.sendmail("bounce-1@em.acme.example",
                                   [f"r{i}@example.edu" for i in range(n)], MESSAGE) or (250, None)

    assert to(25) == (250, None)
    with pytest.raises(smtplib.SMTPDataError) as err:
        to(20)  # 25 + 20 > 40 (the sender's own, stricter than the gateway's 50)
    assert (err.value.smtp_code, err.value.smtp_error) == (
        451, b"4.7.1 Recipients of sender acme are limited to 40/minute; retry in 60 s")
    assert to(15) == (250, None)  # 25 + 15 = 40: fits
    assert [len(m.rcpt_tos) for m in sink.messages] == [25, 15]
    assert gw.metric("gateway_rate_deferrals_total", sender="acme", limit="recipients") == 1
