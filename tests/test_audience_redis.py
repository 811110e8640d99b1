"""Policy IV.B.3.c.iv with a cluster: two gateways sharing one real redis-server count one
campaign's audience together (a HyperLogLog of keyed hashes), and what happens when Redis
goes away."""

from __future__ import annotations


import pytest
import redis

from tests.test_audience import at, campaign, message, people, send, start



def test_two_gateways_count_one_audience_together(gateways, redis_server, sink, logs):
    # both gateways read the same [logging] hash_key_file, as a cluster must
    toml = (f'[state]\nurl = "{redis_server.url}"\n'
            "[business_hours]\nlarge_audience = 10000\n")
    one, two = start(gateways, sink, toml), start(gateways, sink, toml)
    at(gateways.clock, 2026, 11, 2, 10, 0)
    msg = message(campaign("shared"))
    for n in range(5):
        assert send(one, people(n * 1000, 1000), msg)[0] == 250
    for n in range(5, 9):
        assert send(two, people(n * 1000, 1000), msg)[0] == 250
    # recipients the other gateway already counted add nothing
    assert send(two, people(0, 1000), msg)[0] == 250
    seen = two.metric("gateway_large_audience_max", sender="acme")
    assert abs(seen - 9000) <= 9000 * 0.02  # HyperLogLog: standard error 0.81 %
    # 2000 more through the first gateway: 11,000 together, over 10,000 (neither saw 10,000)
    code, text = send(one, people(9000, 2000), msg)
    assert code == 451 and text.startswith(
        b"4.7.1 Campaign X-Campaign-ID shared has an audience over 10000 university addresses "
        b"(at least ")
    total = one.metric("gateway_large_audience_max", sender="acme")
    assert abs(total - 11000) <= 11000 * 0.02
    [crossing] = logs.events("large_audience_crossed")
    assert crossing["audience"] == total
    # the second gateway defers the campaign too, from now on
    assert send(two, people(0, 1), msg)[0] == 451
    assert len(sink.messages) == 10
    assert one.metric("gateway_large_audience_campaigns_total", sender="acme",
                      basis="observed") + two.metric(
        "gateway_large_audience_campaigns_total", sender="acme", basis="observed") == 1
    # Redis holds HyperLogLog registers and counters under opaque keys: no address, no subject
    client = redis.Redis.from_url(redis_server.url)
    try:
        for key in client.keys("*"):
            assert b"example.edu" not in key and b"student" not in key
            assert b"example.edu" not in client.dump(key)
    finally:
        client.close()


@pytest.mark.parametrize("on_error, expected", [("defer", 451), ("local", 250)])
def test_redis_down(gateways, redis_server, sink, on_error, expected, logs):
    """Redis gone: "defer" leaves the 451 4.3.0 to rate_limit (the same store), "local" counts
    in this process; either way a declared large audience is deferred in business hours."""
    gw = start(gateways, sink, f'[state]\nurl = "{redis_server.url}"\non_error = "{on_error}"\n'
                               "[business_hours]\nlarge_audience = 10\n")
    at(gateways.clock, 2026, 11, 2, 10, 0)
    redis_server.stop()
    code, text = send(gw, people(0, 5), message(campaign("c")))
    assert code == expected
    if on_error == "local":  # counted in the process: the campaign still crosses
        code, text = send(gw, people(5, 6), message(campaign("c")))
        assert (code, text[:16]) == (451, b"4.7.1 Campaign X")
        assert [e["audience"] for e in logs.events("large_audience_crossed")] == [11]
    code, text = send(gw, people(0, 1), message(campaign("d"), "X-Audience-Size: 20000"))
    assert code == 451 and text.startswith(b"4.7.1 Campaign X-Campaign-ID d has an audience")
    assert any(e.get("check") == "large_audience" for e in logs.lines()
               if e["event"].startswith("state_unavailable"))
