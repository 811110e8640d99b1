"""Prometheus metrics, registered on a CollectorRegistry that the caller passes in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "gateway_messages", "Message decisions by sender, decision and reason",
            ["sender", "decision", "reason"], registry=registry)
        self.recipients = Counter(
            "gateway_recipients", "Recipients by sender and decision",
            ["sender", "decision"], registry=registry)
        self.sessions = Gauge("gateway_sessions_active", "SMTP sessions open now",
                              registry=registry)
        self.connections = Counter("gateway_connections", "SMTP connections accepted",
                                   registry=registry)
        self.check_seconds = Histogram(
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

    def upstream_reply(self, stage: str, code: int) -> None:
        self.upstream_replies.labels(stage, f"{code // 100}xx").inc()
