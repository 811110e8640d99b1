"""The milter listeners: ``inet:host:port`` and ``unix:/path`` sockets, a bound on the MTA
connections open at once, and a stop that lets decisions in progress finish."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway.infra.config import parse_hostport
from gateway.engine.sessions import SessionCounts
from gateway.milter.session import MilterSession

if TYPE_CHECKING:
    from gateway.message.arc import ArcSealer
    from gateway.infra.config import Config
    from gateway.engine import Engine
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics

log = structlog.get_logger("gateway.milter")


class MilterServer:
    def __init__(self, *, config: Config, engine: Engine, maillog: MailLog,
                 metrics: Metrics, counts: SessionCounts | None = None,
                 arc: ArcSealer | None = None) -> None:
        self.config = config
        self.counts = counts or SessionCounts(config.limits, metrics)
        self.arc = arc  # [arc]: seal what the MTA relays (gateway.message.arc)
        self.engine = engine
        self.maillog = maillog
        self.metrics = metrics
        self.servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []
        self.tasks: dict[asyncio.Task, MilterSession] = {}
        self._sockets: list[Path] = []

    async def start(self) -> None:
        cfg = self.config.milter
        for item in cfg.listen:
            if item.startswith("unix:"):
                path = Path(item[5:])
                if path.is_socket():
                    path.unlink()  # left by an unclean stop
                server = await asyncio.start_unix_server(self._serve, path=str(path))
                os.chmod(path, int(cfg.socket_mode, 8))
                self._sockets.append(path)
                self.addresses.append(f"unix:{path}")
            else:
                host, port = parse_hostport(item[5:])
                server = await asyncio.start_server(self._serve, None if host == "*" else host,
                                                    port)
                self.addresses += [f"inet:{h}:{p}" if ":" not in h else f"inet:[{h}]:{p}"
                                   for h, p, *_ in (s.getsockname() for s in server.sockets)]
            self.servers.append(server)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self.tasks) >= self.config.milter.max_connections:
            # the MTA applies its milter_default_action (tempfail) to this session
            log.warning("milter_connection_refused", reason="max_connections",
                        limit=self.config.milter.max_connections)
            writer.close()
            return
        session = MilterSession(self, reader, writer)
        self.tasks[task] = session
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        try:
            await session.run()
        except asyncio.CancelledError:
            log.warning("milter_session_ended", session=session.id, reason="gateway stopping",
                        in_transaction=session.txn is not None or session.deciding)
            raise
        except Exception as exc:  # one clear line; the MTA tempfails the session
            log.error("milter_internal_error", error=repr(exc), exc_info=exc)
        finally:
            self.tasks.pop(task, None)
            self.metrics.sessions.dec()
            writer.close()

    async def stop(self, grace: float) -> None:
        """Stop listening; let the decisions in progress finish (up to ``grace`` seconds) and
        close every connection (the MTA applies its default action, tempfail, to a transaction
        left open)."""
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(s.deciding for s in self.tasks.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        for path in self._sockets:
            path.unlink(missing_ok=True)
