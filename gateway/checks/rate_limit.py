"""Policy IV.B.3.c.vi-vii: at most thirty messages per minute per sender, and the ability to
throttle the sending rate to balance server load.

Runs last, when the message is otherwise ready to relay, so a rejected or deferred message never
spends budget. The limit holds for every sliding 60-second window (a log of relay times per
sender in the state backend, admitted atomically), not only calendar minutes. Over the limit, the
reply to the final dot is held while capacity frees up, for at most ``[limits] max_hold``
seconds; if the budget will not allow the message by then, it is deferred at once with
``451 4.7.1`` saying the rate and when to retry: vendor MTAs retry, so nothing is lost.
"""

from __future__ import annotations

import math
import secrets

import structlog

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, defer
from gateway.rates import Rate
from gateway.state import Admission, Limit, StoreError
from gateway.state.memory import MemoryStore
from gateway.throttles import GLOBAL, Throttles

log = structlog.get_logger("gateway.limits")


def _per_period(rates: list[Rate]) -> list[Rate]:
    """The strictest rate for each distinct period (each period is its own sliding window)."""
    best: dict[int, Rate] = {}
    for rate in rates:
        if rate.period not in best or rate.count < best[rate.period].count:
            best[rate.period] = rate
    return [best[p] for p in sorted(best)]


class RateLimit(Check):
    name = "rate_limit"
    stage = Stage.DATA
    description = "sender and gateway-wide sending rates, with run-time throttles"
    uses_message = False

    def __init__(self, deps) -> None:
        super().__init__(deps)
        limits = deps.config.limits
        self.ceiling = limits.ceiling
        self.global_rate = Rate.parse(limits.global_rate) if limits.global_rate else None
        self.max_hold = limits.max_hold
        self.on_error = deps.config.state.on_error
        self.throttles = deps.throttles or Throttles(deps.state, deps.clock,
                                                     limits.throttle_refresh)
        self.local = MemoryStore(deps.clock)  # per-process fallback for on_error = "local"
        self.metrics = deps.metrics

    async def _throttle(self, target: str) -> Rate | None:
        try:
            return await self.throttles.current(target)
        except StoreError:
            if self.on_error != "local":
                raise
            return self.throttles.cached(target)  # the throttles as last seen

    async def sender_rates(self, sender_id: str, own: Rate | None) -> list[Rate]:
        rates = [self.ceiling]
        if own is not None:
            rates.append(own)
        throttle = await self._throttle(sender_id)
        if throttle is not None:
            rates.append(throttle)
        return _per_period(rates)

    async def global_rates(self) -> list[Rate]:
        rates = []
        if self.deps.adaptive is not None:
            rates.append(self.deps.adaptive.rate)
        elif self.global_rate is not None:
            rates.append(self.global_rate)
        throttle = await self._throttle(GLOBAL)
        if throttle is not None:
            rates.append(throttle)
        return _per_period(rates)

    async def _acquire(self, limits: list[Limit], token: str) -> Admission:
        now = self.deps.clock.now().timestamp()
        try:
            return await self.deps.state.acquire(limits, now, token)
        except StoreError as exc:
            if self.on_error != "local":
                raise
            log.warning("state_unavailable_local_limits", error=str(exc))
            if self.metrics is not None:
                self.metrics.state_fallbacks.inc()
            return await self.local.acquire(limits, now, token)

    async def check(self, ctx: Context) -> Verdict:
        sender_id = ctx.sender.id if ctx.sender is not None else f"ip:{ctx.client_ip}"
        try:
            sender_rates = await self.sender_rates(sender_id, ctx.sender.own_rate
                                                   if ctx.sender is not None else None)
            global_rates = await self.global_rates()
        except StoreError as exc:
            return self._store_down(exc)
        limits = ([Limit(f"rate:{sender_id}:{r.period}", r.count, r.period) for r in sender_rates]
                  + [Limit(f"rate:{GLOBAL}:{r.period}", r.count, r.period) for r in global_rates])
        rates = sender_rates + global_rates
        if self.metrics is not None:
            self.metrics.effective_rate.labels(sender_id).set(sender_rates[0].per_second * 60)
        holding = self.settings(ctx).mode == "enforce"
        clock = self.deps.clock
        deadline = clock.monotonic() + (self.max_hold if holding else 0)
        token = secrets.token_hex(8)
        held = False
        while True:
            try:
                admission = await self._acquire(limits, token)
            except StoreError as exc:
                return self._store_down(exc)
            if admission.wait == 0:
                if self.metrics is not None:
                    self.metrics.budget_used.labels(sender_id).set(admission.used)
                return ACCEPT
            if admission.wait > deadline - clock.monotonic():
                return self._deferred(sender_id, rates[admission.limit],
                                      admission.limit >= len(sender_rates), admission.wait)
            if not held and self.metrics is not None:
                self.metrics.holds.labels(sender_id).inc()
            held = True
            await clock.sleep(admission.wait)

    def _deferred(self, sender_id: str, rate: Rate, gateway_wide: bool, wait: float) -> Verdict:
        seconds = max(1, math.ceil(wait))
        if self.metrics is not None:
            self.metrics.rate_deferrals.labels(sender_id, "global" if gateway_wide else "sender").inc()
        if gateway_wide:
            return defer(451, "4.7.1", f"Gateway-wide sending rate is limited to {rate} to "
                         f"protect campus mail; retry in {seconds} s", "global_rate_limited")
        return defer(451, "4.7.1", f"Sending rate of sender {sender_id} is limited to {rate}; "
                     f"retry in {seconds} s", "rate_limited")

    def _store_down(self, exc: StoreError) -> Verdict:
        log.error("state_unavailable", error=str(exc))
        # the same words as every check that finds the state store down: one outage, one reply
        return defer(451, "4.3.0", "Temporary local problem; try again later",
                     "state_unavailable")
