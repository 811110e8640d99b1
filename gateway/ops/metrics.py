"""Prometheus metrics, registered on a CollectorRegistry that the caller passes in."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# One vocabulary of decisions across metrics (gateway_messages_total, gateway_recipients_total,
# gateway_message_classes_total) and the decision log: what happened to a message or recipient.
DECISIONS = ("accept", "reject", "defer", "quarantine", "drop")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopHistogram:
    """A labelled histogram observed many times a message, from the event loop only, exposed
    as prometheus_client's own histogram would be (``_bucket`` with ``le``, ``_count``,
    ``_sum``; no ``_created``) through a custom collector. prometheus_client's Histogram takes
    a lock for its sum and for the bucket at every observation (about 1.2 us, against 0.15 us
    here); one writer, the event loop, needs none. A scrape in another thread may see one
    observation in the sum and not yet in its bucket, as it may with prometheus_client's."""

    def __init__(self, name: str, documentation: str, labelnames: list[str],
                 buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._bounds = tuple(float(b) for b in buckets) + (float("inf"),)
        self._les = [floatToGoString(b) for b in self._bounds]
        self._series: dict[tuple[str, ...], list] = {}  # labels: [count per bucket..., sum]
        registry.register(self)

    def observe(self, labels: tuple[str, ...], amount: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0] * len(self._bounds) + [0.0]
        series[bisect_left(self._bounds, amount)] += 1  # the first bucket with amount <= le
        series[-1] += amount

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self._series.items()):
            counts, total, running, buckets = series[:-1], series[-1], 0, []
            for le, n in zip(self._les, counts):
                running += n
                buckets.append((le, running))
            family.add_metric(list(labels), buckets, total)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "gateway_messages", "Message decisions by sender, decision (accept, reject, defer, "
            "quarantine, drop) and reason",
            ["sender", "decision", "reason"], registry=registry)
        self.recipients = Counter(
            "gateway_recipients", "Recipients by sender and decision (accept, reject, defer, "
            "quarantine, drop: left out by the recipient flags)",
            ["sender", "decision"], registry=registry)
        self.sessions = Gauge("gateway_sessions_active", "SMTP sessions open now",
                              registry=registry)
        self.connections = Counter("gateway_connections", "SMTP connections accepted",
                                   registry=registry)
        self._children: dict[tuple, object] = {}  # see child()
        self.check_seconds = LoopHistogram(
            "gateway_check_seconds", "Time spent in each check", ["check"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.monitored = Counter(
            "gateway_check_monitored", "Verdicts a check in monitor mode would have enforced",
            ["check", "action"], registry=registry)
        self.relay_seconds = Histogram(
            "gateway_relay_seconds", "Time to hand a message to the upstream (DATA to reply)",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_replies = Counter(
            "gateway_upstream_replies", "Upstream replies by SMTP stage and class",
            ["stage", "class"], registry=registry)
        self.bytes = Counter("gateway_relayed_bytes", "Bytes of message data relayed",
                             registry=registry)
        self.message_classes = Counter(
            "gateway_message_classes", "Message decisions at DATA by sender, message class "
            "(transactional, educational, promotional) and decision",
            ["sender", "class", "decision"], registry=registry)
        self.auth_results = Counter(
            "gateway_auth_results", "Sender authentication results (check: spf, dkim, "
            "alignment) by result and sender", ["check", "result", "sender"], registry=registry)
        self.dns_seconds = Histogram(
            "gateway_dns_query_seconds", "DNS queries sent (cache misses) by type and outcome",
            ["qtype", "outcome"], buckets=LATENCY_BUCKETS, registry=registry)
        self.dns_cache = Counter(
            "gateway_dns_cache_lookups", "DNS look-ups by cache outcome: hit, miss, coalesced "
            "(joined a query in flight); hit ratio = hit / all", ["outcome"], registry=registry)
        self.dns_failures = Counter(
            "gateway_dns_failures", "DNS queries that failed, by outcome (timeout, servfail, "
            "error); SPF and DKIM defer while DNS fails", ["outcome"], registry=registry)
        # known label values start at 0, so that rate() and the alerts see them from the start
        for outcome in ("hit", "miss", "coalesced"):
            self.dns_cache.labels(outcome)
        for outcome in ("timeout", "servfail", "error"):
            self.dns_failures.labels(outcome)

        # rate limits and throttles (labels: registered sender ids, bounded by the registry)
        self.holds = Counter("gateway_rate_holds", "Messages whose reply was held for budget",
                             ["sender"], registry=registry)
        self.rate_deferrals = Counter(
            "gateway_rate_deferrals", "Messages deferred (451 4.7.1) by rate limits, by sender "
            "and limit (sender, global, recipients)", ["sender", "limit"], registry=registry)
        self.effective_rate = Gauge(
            "gateway_rate_effective_per_second", "A sender's effective rate (after its own rate "
            "and throttles), messages per second", ["sender"], registry=registry)
        self.budget_used = Gauge(
            "gateway_rate_budget_used", "Messages in the sender's current sliding window",
            ["sender"], registry=registry)
        self.adaptive_rate = Gauge(
            "gateway_adaptive_rate_per_second", "The adaptive gateway-wide rate now, messages "
            "per second", registry=registry)
        self.adaptive_changes = Counter(
            "gateway_adaptive_rate_changes", "Adaptive rate steps by direction and cause",
            ["reason"], registry=registry)
        self.state_fallbacks = Counter(
            "gateway_state_fallbacks", "Rate decisions made with per-process limits because the "
            "state store was unreachable ([state] on_error = \"local\")", registry=registry)
        self.state_errors = Counter(
            "gateway_state_errors", "Message decisions that could not use the state store "
            "(a check deferred, reason ending in state_unavailable)", registry=registry)
        self.sessions_refused = Counter(
            "gateway_sessions_refused", "Sessions refused (421 4.7.0) over a cap: ip, sender, "
            "total (sessions_total) or rate (connection_rate); idle: closed (421 4.4.2) for "
            "silence inside a transaction ([upstream] transaction_idle)", ["cap"],
            registry=registry)
        self.auth_failures = Counter(
            "gateway_auth_failures", "Failed SMTP AUTH attempts by reason: invalid (wrong "
            "credentials), locked_out (the IP was locked out; not verified)", ["reason"],
            registry=registry)
        self.auth_throttled = Counter(
            "gateway_auth_throttled", "AUTH throttling actions: delay (reply held back), "
            "lockout (an IP reached auth_lockout), disconnect (421 after "
            "auth_failures_per_session)", ["action"], registry=registry)

        # large audiences in business hours (policy IV.B.3.c.iv; labels: registered sender ids)
        self.large_audience_campaigns = Counter(
            "gateway_large_audience_campaigns", "Campaigns whose audience went over [business_hours] "
            "large_audience, counted once at the crossing, by sender and basis (declared, lists, "
            "observed)", ["sender", "basis"], registry=registry)
        self.large_audience_refusals = Counter(
            "gateway_large_audience_deferrals", "Messages of large-audience campaigns refused "
            "during business hours (in monitor mode: that would have been), by sender, reason (what made the audience large: declared, "
            "lists, observed) and action (defer: 451, reject: 550)",
            ["sender", "reason", "action"], registry=registry)
        self.large_audience_max = Gauge(
            "gateway_large_audience_max", "Audience size of the sender's largest campaign seen "
            "within [business_hours] window (by this gateway)", ["sender"], registry=registry)

        # one-click unsubscribes recorded by the gateway (gateway.ops.unsubscribe_endpoint); the
        # recipients the flags left out are gateway_recipients{decision="drop"}
        self.unsubscribes = Counter(
            "gateway_unsubscribes", "One-click unsubscribe requests by outcome: recorded, "
            "replayed (already recorded), invalid, expired, bad_request, unavailable",
            ["outcome"], registry=registry)
        self.unsubscribe_forwards = Counter(
            "gateway_unsubscribe_forwards", "One-click unsubscribes forwarded to the vendor, by "
            "result (ok, failed)", ["result"], registry=registry)
        self.flags_unchecked = Counter(
            "gateway_flags_unchecked", "Messages or recipients let through without the recipient "
            "flags because the state store was unreachable ([state] on_error = \"local\")",
            registry=registry)

        self.trace_dropped = Counter(
            "gateway_trace_dropped", "Decision records not kept in the trace (queue full or state "
            "store unavailable); the decisions themselves are unaffected", registry=registry)
        # reloads of gateway.toml and the sender files (gateway.ops.reload)
        self.reloads = Counter(
            "gateway_config_reloads", "Reloads of gateway.toml and the sender files by result: "
            "applied, refused (invalid; the running configuration stays)", ["result"],
            registry=registry)
        self.config_generation = Gauge(
            "gateway_config_generation", "Configuration generation in use for new transactions: "
            "0 at start, one more per applied reload", registry=registry)
        # what ops watch (gateway.ops.monitor): build, upstream health, quarantine, registrations
        self.build_info = Gauge("gateway_build_info", "Always 1; the running version in a label",
                                ["version"], registry=registry)
        self.upstream_up = Gauge(
            "gateway_upstream_up", "1 if the last probe of the upstream host succeeded (connect, "
            "220 banner, EHLO, QUIT; a Maildir: writable), else 0", ["host"], registry=registry)
        self.state_up = Gauge("gateway_state_up", "1 if the last ping of the state store "
                              "succeeded, else 0", registry=registry)
        self.quarantine_messages = Gauge("gateway_quarantine_messages",
                                         "Messages in the quarantine now", registry=registry)
        self.admin_actions = Counter(
            "gateway_admin_actions", "Administrative actions in the audit trail ([logging] "
            "audit_file), by action, whoever took them (CLI or admin API)", ["action"],
            registry=registry)
        self.registration_expiry = Gauge(
            "gateway_sender_registration_expiry_timestamp_seconds", "When the sender's "
            "registration (policy exception) ends: the end of its expires date, UTC, Unix time",
            ["sender"], registry=registry)

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, each labelled child looked up once: labels() validates
        and converts its values under a lock, and the per-message paths ask for the same few
        children (a sender, a decision, a reason) every time. The children are the metric's own,
        so the series are the same; nothing here removes a child (a metric whose children are
        removed or cleared, like registration_expiry, is not asked through this)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def check_observed(self, check: str, seconds: float) -> None:
        """A check's run time (a check runs ~15 times a message: see LoopHistogram)."""
        self.check_seconds.observe((check,), seconds)

    def upstream_reply(self, stage: str, code: int) -> None:
        self.child(self.upstream_replies, stage, f"{code // 100}xx").inc()
