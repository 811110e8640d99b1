"""Relay to campus mail, before-queue: the client's reply to its final dot is the upstream's."""

from gateway.relay.base import Transaction, Upstream, UpstreamError, open_upstream

__all__ = ["Transaction", "Upstream", "UpstreamError", "open_upstream"]
