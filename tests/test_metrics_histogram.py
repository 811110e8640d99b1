"""gateway.ops.metrics.LoopHistogram (the per-check timings, observed ~15 times a message without
prometheus_client's locks) is exposed exactly as prometheus_client's own Histogram, less the
``_created`` series."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.ops.metrics import LATENCY_BUCKETS, LoopHistogram

_VALUES = st.one_of(st.sampled_from([0.0, *LATENCY_BUCKETS, 11.0]),
                    st.floats(min_value=0, max_value=20, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["identity", "rate_limit", 'we"ird\n']), _VALUES),
                max_size=40))
def test_exposition_is_prometheus_clients_own(observations):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("gateway_check_seconds", "Time spent in each check", ["check"],
                          buckets=LATENCY_BUCKETS, registry=theirs)
    loop = LoopHistogram("gateway_check_seconds", "Time spent in each check", ["check"],
                         LATENCY_BUCKETS, ours)
    for check, seconds in observations:
        histogram.labels(check).observe(seconds)
        loop.observe((check,), seconds)
    expected = [line for line in generate_latest(theirs).decode().splitlines()
                if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == expected
    for check, _ in observations:
        assert ours.get_sample_value("gateway_check_seconds_count", {"check": check}) == \
            theirs.get_sample_value("gateway_check_seconds_count", {"check": check})
