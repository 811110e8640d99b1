"""The event loop ``gateway serve`` runs on: ``[server] event_loop``, ``"auto"`` (the default:
uvloop when the uvloop package is installed, as it is with the gateway's dependencies on Linux
and macOS, else asyncio), ``"asyncio"`` (the standard library's) or ``"uvloop"`` (libuv's;
without the package the gateway says so in its log and runs on asyncio). uvloop cuts the CPU
the event loop itself spends per message (socket reads and writes, callbacks: about a tenth
of a relayed message's); see README's performance section."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


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
