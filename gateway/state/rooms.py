"""What this process last learned of its rate windows' room, so that the rate check's MAIL half
(checks.rate_limit.RateLimitAtMail) may skip its look at the store while there is plenty.

The MAIL half only refuses early; the DATA half's admission (``Store.acquire``) decides, exactly
and atomically. A look skipped on knowledge that turned out stale therefore only lets a message
in that the end of it then defers, as it would without the early refusal; it never refuses one:
a refusal at MAIL always comes from a real look.

Each window key is remembered with the count and window it was learned for and its room (count
less the events in it) from the store's last answer to this process: every admission or look
replaces it, so the room already discounts this process's own admissions since. It is trusted
only

- for the very same limit (key, count and window): a throttle lowered at run time, a reload or
  a changed sender rate changes the count or adds a key, so the next MAIL looks;
- while younger than ``FRESH`` (1 s on the injected monotonic clock, the throttles' refresh):
  other gateways sharing the store may spend the room meanwhile, and this bounds for how long
  this process does not see it;
- while, after the message's own cost, at least ``margin(count)`` is left (a tenth of the
  count, at least 2): near the limit the MAIL half always looks, so a sender that runs out of
  room is refused at MAIL as before, and what others spent within ``FRESH`` must exceed the
  margin before a message is received only to be deferred at its end.

A look's answer may arrive after that of an admission that began later (Redis, several
connections): the room is then overstated by the calls in flight, which the margin also covers.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.state import Admission, Limit


def margin(count: int) -> int:
    """The room that must be left, after the message, for a look to be skipped."""
    return max(2, -(-count // 10))


class Rooms:
    FRESH = 1.0  # seconds, monotonic
    SIZE = 8192  # window keys remembered (a few per sender); the least recently learned go first

    def __init__(self, size: int = SIZE, fresh: float = FRESH) -> None:
        self.size, self.fresh = size, fresh
        # key -> (count, window, room, monotonic time learned)
        self._known: OrderedDict[str, tuple[int, float, int, float]] = OrderedDict()

    def learn(self, limits: list[Limit], admission: Admission, at: float) -> None:
        """Remember what the store answered at ``at`` (monotonic) for ``limits``."""
        known = self._known
        for (key, count, window, _), room in zip(limits, admission.rooms):
            known[key] = (count, window, room, at)
            known.move_to_end(key)
        while len(known) > self.size:
            known.popitem(last=False)

    def ample(self, limits: list[Limit], at: float) -> bool:
        """Whether every limit is known, fresh and with room to spare for its cost."""
        if not limits:
            return False
        for key, count, window, cost in limits:
            known = self._known.get(key)
            if known is None:
                return False
            k_count, k_window, room, learned = known
            if (k_count != count or k_window != window or at - learned >= self.fresh
                    or room - cost < margin(count)):
                return False
        return True

    def __len__(self) -> int:
        return len(self._known)
