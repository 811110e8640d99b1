"""The event loop ``gateway serve`` runs on: ``[server] event_loop``, ``"auto"`` (the default:
uvloop when the uvloop package is installed, as it is with the gateway's dependencies on Linux
and macOS, else asyncio), ``"asyncio"`` (the standard library's) or ``"uvloop"`` (libuv's;
without the package the gateway says so in its log and runs on asyncio). uvloop cuts the CPU
the event loop itself spends per message (socket reads and writes, callbacks: about a tenth
of a relayed message's); see README's performance section."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

# Python's cyclic garbage collector scans its young generation every 700 net allocations of
# container objects (the default): a relayed message makes some hundreds, so it ran about every
# other message, and promoted what was still in flight to be scanned again by the older
# generations. Measured with bench/throughput.py (--checks all), a run of 2,000 messages spent
# 84-103 ms in the collector at the default and 28-45 ms at 10,000; a young pass then takes
# about 2-3 ms, within the added-latency target. Reference counting frees nearly everything a
# message makes; only reference cycles wait for the collector, a few thousand allocations longer.
GC_YOUNG_THRESHOLD = 10_000


def loop_factory(name: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """(the factory for asyncio.Runner — None: the default loop —, the loop actually used)."""
    if name in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            return None, "asyncio"
        return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


def running_loop_name() -> str:
    """The name of the running loop's implementation, for the start-up log line."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"


def tune_gc() -> tuple[int, int, int]:
    """Collect the young generation every GC_YOUNG_THRESHOLD allocations, not 700 (``gateway
    serve`` does this once, at start); returns the thresholds now in force."""
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:  # (0: collection is disabled; left so)
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    return gc.get_threshold()
