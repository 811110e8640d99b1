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

It also remembers the opposite: an answer that these limits have no room for the cost before a
time (the store's ``wait``, from its clock). Budget is never given back and events only leave a
window as time passes, so until then no look can find room, whatever other gateways spend: the
MAIL half refuses a retrying sender from that answer (:meth:`Rooms.full`) while it is younger
than ``FRESH``, for the very same limits and costs, with the wait that is left, as a look would.
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
        # the limits as asked -> (store time before which they have no room, the limit that
        # keeps it, monotonic time learned)
        self._full: OrderedDict[tuple[Limit, ...], tuple[float, int, float]] = OrderedDict()

    def learn(self, limits: list[Limit], admission: Admission, at: float,
              now: float | None = None) -> None:
        """Remember what the store answered at ``at`` (monotonic) for ``limits``; with ``now``
        (the store time the question was asked at), also a wait it answered."""
        known = self._known
        for (key, count, window, _), room in zip(limits, admission.rooms):
            known[key] = (count, window, room, at)
            known.move_to_end(key)
        while len(known) > self.size:
            known.popitem(last=False)
        if now is None:
            return
        full, asked = self._full, tuple(limits)
        if admission.wait > 0:
            full[asked] = (now + admission.wait, admission.limit, at)
            full.move_to_end(asked)
            while len(full) > self.size:
                full.popitem(last=False)
        else:
            full.pop(asked, None)

    def full(self, limits: list[Limit], at: float, now: float) -> tuple[float, int] | None:
        """(seconds from ``now`` until these very limits can have room, the limit that keeps
        it) from an answer younger than ``fresh`` at ``at`` (monotonic); None when there is
        none, or its time has come."""
        found = self._full.get(tuple(limits))
        if found is None:
            return None
        until, limit, learned = found
        if at - learned >= self.fresh or until <= now:
            return None
        return until - now, limit

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
