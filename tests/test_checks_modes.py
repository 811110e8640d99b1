"""Check modes end to end: monitor logs and counts what it would have done; off skips;
a sender's own file overrides the global mode."""

from __future__ import annotations

from tests.conftest import EXAMPLE_SENDER, send


def test_monitor_mode_accepts_and_records_the_would_be_rejection(gateways, sink, logs):
    gw = gateways.start('[checks.return_path]\nmode = "monitor"\n', upstream=sink.url)
    client, (code, _) = send(gw, mail_from="news@em.acme.example")
    client.quit()
    assert code == 250 and len(sink.messages) == 1
    [line] = logs.events("message")
    assert line["decision"] == "accept"
    assert line["monitored"] == [{"check": "return_path", "would": "reject",
                                  "reason": "return_path_mismatch"}]
    assert gw.metric("gateway_check_monitored_total", check="return_path", action="reject") == 1


def test_off_mode_skips_the_check(gateways, sink, logs):
    gw = gateways.start('[checks.registration]\nmode = "off"\n', upstream=sink.url)
    gateways.clock.set(gateways.clock.now().replace(year=2028))
    client, (code, _) = send(gw)
    client.quit()
    assert code == 250
    assert "registration" not in logs.events("message")[0]["checks_ms"]


def test_sender_file_overrides_global_mode(gateways, sink):
    lenient = EXAMPLE_SENDER + '\n[checks.return_path]\nmode = "monitor"\n'
    strict = (EXAMPLE_SENDER.replace('"acme"', '"beta"').replace("bounce-*@em.acme.example", "b-*@em.beta.example")
              .replace('["em.acme.example"]', '["em.beta.example"]').replace('"127.0.0.1/32", ', ""))
    gw = gateways.start(senders={"acme": lenient, "beta": strict}, upstream=sink.url)
    client, (code, _) = send(gw, mail_from="news@em.acme.example")
    client.quit()
    assert code == 250
    gw2 = gateways.start('[checks.return_path]\nmode = "monitor"\n',
                         senders={"acme": EXAMPLE_SENDER + '\n[checks.return_path]\nmode = "enforce"\n'},
                         upstream=sink.url)
    client = gw2.smtp()
    assert client.mail("news@em.acme.example")[0] == 550
    client.quit()


def test_no_parse_when_no_check_reads_the_message(gateways, sink, logs):
    from gateway.checks import CHECKS

    names = {c.name for c in CHECKS if c.uses_message} - {"identity", "registration", "return_path"}
    off = "".join(f'[checks.{name}]\nmode = "off"\n' for name in sorted(names))
    gw = gateways.start(off, upstream=sink.url)
    engine = gw.gateway.engine
    parsed = []
    original = engine.parse

    async def spy(content):
        parsed.append(len(content))
        return await original(content)

    engine.parse = spy
    client, (code, _) = send(gw)
    client.quit()
    assert code == 250 and parsed == []
    assert logs.events("message")[0]["message_id"] == "<m1@em.acme.example>"
    engine.parse = original
