"""Adaptive global rate: when campus mail answers 4xx or slows beyond a bound, the gateway-wide
rate steps down (multiplicative decrease); once campus mail is healthy again it recovers step by
step (additive increase), back to the configured ``global_rate``. Each gateway adapts to what it
observes itself."""

from __future__ import annotations

from gateway.infra.clock import Clock
from gateway.policy.rates import Rate


class AdaptiveRate:
    def __init__(self, base: Rate, floor: Rate, decrease: float, increase: float,
                 interval: float, latency_bound: float, clock: Clock, on_change=None) -> None:
        self.base, self.floor = base, Rate(min(floor.count, base.count), base.period)
        if floor.period != base.period:  # express the floor in the base's period
            self.floor = Rate(max(1, min(base.count, round(floor.per_second * base.period))),
                              base.period)
        self.decrease, self.increase = decrease, increase
        self.interval, self.latency_bound = interval, latency_bound
        self.clock = clock
        self.on_change = on_change or (lambda rate, why: None)
        self.rate = base
        self._last_change = clock.monotonic()

    def observe(self, code: int, latency: float) -> None:
        """One upstream reply to a message: its code and how long it took."""
        now = self.clock.monotonic()
        trouble = 400 <= code < 500 or latency > self.latency_bound
        if trouble:
            # one step down per interval at most, so a burst of 4xx is one signal, not twenty
            if now - self._last_change >= self.interval or self.rate == self.base:
                new = Rate(max(self.floor.count, int(self.rate.count * self.decrease)),
                           self.rate.period)
                self._set(new, now, "upstream_4xx" if 400 <= code < 500 else "upstream_slow")
            return
        if self.rate.count < self.base.count and now - self._last_change >= self.interval:
            step = max(1, round(self.base.count * self.increase))
            self._set(Rate(min(self.base.count, self.rate.count + step), self.rate.period),
                      now, "recovering")

    def _set(self, rate: Rate, now: float, why: str) -> None:
        self._last_change = now
        if rate != self.rate:
            self.rate = rate
            self.on_change(rate, why)
