"""Policy IV.B.3.c.vi-vii: at most thirty messages per minute per sender, and the ability to
throttle the sending rate to balance server load.

Runs last, when the message is otherwise ready to relay, so a rejected or deferred message never
spends budget. A first look at MAIL (:class:`RateLimitAtMail`) refuses a sender that is over
its rate before the message is sent at all. The limit holds for every sliding 60-second window (a log of relay times per
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
from gateway.policy.rates import Rate
from gateway.state import Admission, Limit, StoreError
from gateway.state.memory import MemoryStore
from gateway.policy.throttles import GLOBAL, Throttles

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
        self.recipient_ceiling = (Rate.parse(limits.recipient_rate) if limits.recipient_rate
                                  else None)
        self.max_hold = limits.max_hold
        self.on_error = deps.config.state.on_error
        self.throttles = deps.throttles or Throttles(deps.state, deps.clock,
                                                     limits.throttle_refresh)
        self.local = MemoryStore(deps.clock)  # per-process fallback for on_error = "local"
        self.metrics = deps.metrics
        self.rooms = deps.rooms  # the room last learned from the store, by both halves

    def inherit(self, previous: RateLimit) -> None:
        self.local = previous.local  # the per-process windows used while the store is down
        # both halves take over the same one (the old generation's messages in flight still
        # tell it what they spend); it is only trusted for the very same limits
        self.rooms = previous.rooms

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
        now, at = self.deps.clock.now().timestamp(), self.deps.clock.monotonic()
        try:
            admission = await self.deps.state.acquire(limits, now, token)
            # (dated from before the call: no younger)
            self.rooms.learn(limits, admission, at, now)
            return admission
        except StoreError as exc:
            if self.on_error != "local":
                raise
            log.warning("state_unavailable_local_limits", error=str(exc))
            if self.metrics is not None:
                self.metrics.state_fallbacks.inc()
            return await self.local.acquire(limits, now, token)

    async def budget(self, ctx: Context) -> tuple[str, list[tuple[Limit, str, Rate]],
                                                   list[Rate]]:
        """The sender's id, what the message would spend — (limit, what it limits, its rate):
        messages per sender, messages through the gateway and, when configured, recipients per
        sender (a message costs one per recipient; at MAIL, before any, at least one) — and
        the sender's rates. StoreError when the throttles cannot be read."""
        sender_id = ctx.sender.id if ctx.sender is not None else f"ip:{ctx.client_ip}"
        sender_rates = await self.sender_rates(sender_id, ctx.sender.own_rate
                                               if ctx.sender is not None else None)
        global_rates = await self.global_rates()
        budget = ([(Limit(f"rate:{sender_id}:{r.period}", r.count, r.period), "sender", r)
                   for r in sender_rates]
                  + [(Limit(f"rate:{GLOBAL}:{r.period}", r.count, r.period), "global", r)
                     for r in global_rates])
        rcpt_rate = self.recipient_rate(ctx)
        if rcpt_rate is not None:
            cost = min(max(1, len(ctx.recipients)), rcpt_rate.count)  # a bigger one takes all
            budget.append((Limit(f"rcpt:{sender_id}:{rcpt_rate.period}", rcpt_rate.count,
                                 rcpt_rate.period, cost), "recipients", rcpt_rate))
        return sender_id, budget, sender_rates

    async def check(self, ctx: Context) -> Verdict:
        try:
            sender_id, budget, sender_rates = await self.budget(ctx)
        except StoreError as exc:
            return self._store_down(exc)
        limits = [limit for limit, _, _ in budget]
        if ctx.dry_run:  # explain: a look at the budget, never a take
            return await self._look(ctx, sender_id, budget)
        if self.metrics is not None:
            self.metrics.child(self.metrics.effective_rate, sender_id).set(
                min(r.per_second for r in sender_rates))
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
                    self.metrics.child(self.metrics.budget_used, sender_id).set(admission.used)
                return ACCEPT
            if admission.wait > deadline - clock.monotonic():
                _, kind, rate = budget[admission.limit]
                return self._deferred(sender_id, rate, kind, admission.wait)
            if not held and self.metrics is not None:
                self.metrics.holds.labels(sender_id).inc()
            held = True
            await clock.sleep(admission.wait)

    async def _look(self, ctx: Context, sender_id: str,
                    budget: list[tuple[Limit, str, Rate]]) -> Verdict:
        """Defer when the budget cannot free within ``max_hold``, spending nothing."""
        now = self.deps.clock.now().timestamp()
        try:
            admission = await self.deps.state.peek([limit for limit, _, _ in budget], now)
        except StoreError as exc:
            if self.on_error == "local":
                return ACCEPT  # the DATA half decides, with the per-process limits
            return self._store_down(exc)
        if admission.wait > self.max_hold:
            _, kind, rate = budget[admission.limit]
            return self._deferred(sender_id, rate, kind, admission.wait, count=not ctx.dry_run)
        return ACCEPT

    def recipient_rate(self, ctx: Context) -> Rate | None:
        """The recipients-per-period limit: the stricter of [limits] recipient_rate and the
        sender's own ``recipient_rate`` (None when neither is set)."""
        own = ctx.sender.own_recipient_rate if ctx.sender is not None else None
        if self.recipient_ceiling is None:
            return own
        return self.recipient_ceiling.at_most(own)

    def _deferred(self, sender_id: str, rate: Rate, kind: str, wait: float,
                  count: bool = True) -> Verdict:
        seconds = max(1, math.ceil(wait))
        if count and self.metrics is not None:
            self.metrics.rate_deferrals.labels(sender_id, kind).inc()
        if kind == "global":
            return defer(451, "4.7.1", f"Gateway-wide sending rate is limited to {rate} to "
                         f"protect campus mail; retry in {seconds} s", "global_rate_limited")
        if kind == "recipients":
            return defer(451, "4.7.1", f"Recipients of sender {sender_id} are limited to "
                         f"{rate}; retry in {seconds} s", "recipient_rate_limited")
        return defer(451, "4.7.1", f"Sending rate of sender {sender_id} is limited to {rate}; "
                     f"retry in {seconds} s", "rate_limited")

    def _store_down(self, exc: StoreError) -> Verdict:
        log.error("state_unavailable", error=str(exc))
        # the same words as every check that finds the state store down: one outage, one reply
        return defer(451, "4.3.0", "Temporary local problem; try again later",
                     "state_unavailable")


class RateLimitAtMail(RateLimit):
    """The MAIL half, the early refusal: when the sender's budget (or the gateway-wide one, or
    its recipients' with one recipient) cannot free within ``max_hold``, with the rates and
    throttles in force now, MAIL is answered with the very 451 4.7.1 the end of the message
    would get, before anything reaches campus mail and before the vendor sends its body. It
    only looks (``Store.peek``): budget is spent at the end of the message, by relayed ones
    alone. So a sender over its rate costs one MAIL command per retry, in every one of its
    sessions, and a message that passes here is still decided by the DATA half (others may
    have spent the budget meanwhile). Enforce mode only: a monitored limit is reported once,
    at the end of the message.

    It does not look when the store's last answer to this process (the DATA half's last
    admission or its own last look) for these very limits, under a second ago, showed ample
    room (gateway.state.rooms): it accepts then, as the look would have; or showed no room
    before a time still more than ``max_hold`` away: it refuses then, with the wait that is
    left, as the look would (budget is never given back, so only time frees it: a retrying
    sender over its rate costs one look a second, not one a retry). ``gateway explain``
    always looks."""

    stage = Stage.MAIL

    def active(self, ctx: Context) -> bool:
        return self.settings(ctx).mode == "enforce"

    async def check(self, ctx: Context) -> Verdict:
        clock = self.deps.clock
        try:
            sender_id, budget, _ = await self.budget(ctx)
            limits = [limit for limit, _, _ in budget]
            at, now = clock.monotonic(), clock.now().timestamp()
            if not ctx.dry_run:  # what the look would answer (see gateway.state.rooms)
                if self.rooms.ample(limits, at):
                    return ACCEPT
                full = self.rooms.full(limits, at, now)
                if full is not None and full[0] > self.max_hold:
                    _, kind, rate = budget[full[1]]
                    return self._deferred(sender_id, rate, kind, full[0])
            admission = await self.deps.state.peek(limits, now)
        except StoreError:
            # the store is down: the end of the message decides, as for every check that
            # needs it (on_error: 451 4.3.0, or the per-process limits)
            return ACCEPT
        if not ctx.dry_run:
            self.rooms.learn(limits, admission, at, now)
        if admission.wait > self.max_hold:
            _, kind, rate = budget[admission.limit]
            return self._deferred(sender_id, rate, kind, admission.wait, count=not ctx.dry_run)
        return ACCEPT
