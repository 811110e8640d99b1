"""Decisions kept in the state store for ``[trace] days``, so that an administrator can answer
"why was my message refused?" by queue id, Message-ID or sender and time.

One record per decided transaction (what the decision log line says: sender, client IP,
return-path, Message-ID, size, recipients as keyed hashes — HMAC-SHA-256 with ``[logging]
hash_key_file``, never addresses —, stage, decision, reason, reply, per-check times). Never a
body. Three keys per record, each expiring after ``days``:

    trace:q:QUEUE_ID                          the record (JSON)
    trace:s:SENDER:YYYYMMDDHH:QUEUE_ID        by sender and hour (empty value)
    trace:m:HASH(MESSAGE-ID):QUEUE_ID         by Message-ID (empty value)

Records are written by a background task from a bounded queue, off the message's path, in
batches (at most a quarter of a second late; one store round trip a batch): a full
queue drops the record (counted in ``gateway_trace_dropped_total``), never the message. Stores
that do not expire keys by themselves (SQLite) are purged by the retention job every hour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
from typing import TYPE_CHECKING

import structlog

from gateway.engine.message import message_id
from gateway.infra import jsontext
from gateway.state import StoreError

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.engine.transaction import Transaction
    from gateway.ops.metrics import Metrics
    from gateway.message.replies import Reply
    from gateway.state import Store

log = structlog.get_logger("gateway.ops.trace")

QUEUE_MAX = 10000
BATCH_MAX = 200  # records a store round trip (SQLite: one transaction on the event loop)
LINGER = 0.25  # seconds the writer waits for more records before writing a batch
PURGE_EVERY = 3600.0
DECISIONS = ("accept", "reject", "defer", "quarantine")


def recipient_hash(key: bytes, address: str) -> str:
    """The keyed hash of a recipient, as the decision log writes it (gateway.ops.maillog)."""
    return hmac.new(key, address.lower().encode(), hashlib.sha256).hexdigest()[:20]


def message_id_key(value: str) -> str:
    """A Message-ID's index key: with or without its angle brackets, the same."""
    text = value.strip().removeprefix("<").removesuffix(">").strip()
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _hour(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y%m%d%H")


class TraceStore:
    def __init__(self, store: Store, key: bytes, clock: Clock, days: int,
                 metrics: Metrics | None = None) -> None:
        self.store, self.key, self.clock, self.metrics = store, key, clock, metrics
        self.ttl = days * 86400.0
        self.enabled = days > 0
        self._queue: asyncio.Queue[dict] = asyncio.Queue(QUEUE_MAX)
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()  # a record queued, or a flush asked for
        self._flushing = 0
        self._hour_cached: tuple[float, str] = (-1.0, "")  # see _hour_of

    # --- recording ------------------------------------------------------------------------

    def record(self, txn: Transaction, action: str, reason: str, reply: Reply | None,
               stage: str, decided_by: str | None) -> dict:
        ctx, outcome = txn.ctx, txn.outcome
        return {
            "at": self.clock.now().timestamp(), "queue_id": txn.queue_id,
            "session": txn.session_id, "sender": ctx.sender.id if ctx.sender else None,
            "client_ip": str(ctx.client_ip), "auth": ctx.auth_user, "tls": ctx.tls,
            "mail_from": ctx.mail_from, "message_id": message_id(ctx), "size": ctx.size,
            "recipients": [recipient_hash(self.key, r) for r in ctx.recipients],
            "stage": stage, "decision": action, "reason": reason, "decided_by": decided_by,
            # an upstream's reply text may name recipients: only its codes
            "reply": (None if reply is None else f"{reply.code} {reply.enhanced}"
                      if decided_by == "upstream" or reason == "relayed" else str(reply)),
            "message_class": ctx.message_class, "checks_ms": outcome.timings_ms,
            "monitored": [{"check": n, "would": v.action, "reason": v.reason}
                          for n, v in outcome.monitored],
        }

    def observe(self, txn: Transaction, action: str, reason: str, reply: Reply | None,
                stage: str, decided_by: str | None) -> None:
        """A decision (an observer of gateway.engine.decisions.Decisions): queued for writing."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(self.record(txn, action, reason, reply, stage, decided_by))
            if self._queue.qsize() >= BATCH_MAX:
                self._wake.set()
        except asyncio.QueueFull:
            if self.metrics is not None:
                self.metrics.trace_dropped.inc()

    def _hour_of(self, ts: float) -> str:
        """``_hour(ts)``, formatted once an hour rather than once a record."""
        start = ts - ts % 3600
        if self._hour_cached[0] != start:
            self._hour_cached = (start, _hour(start))
        return self._hour_cached[1]

    def _rows(self, rec: dict) -> list[tuple[str, bytes, float]]:
        ttl, qid = self.ttl, rec["queue_id"]
        rows = [(f"trace:q:{qid}", jsontext.dumps_bytes(rec), ttl),
                (f"trace:s:{rec['sender'] or '-'}:{self._hour_of(rec['at'])}:{qid}", b"", ttl)]
        if rec["message_id"]:
            rows.append((f"trace:m:{message_id_key(rec['message_id'])}:{qid}", b"", ttl))
        return rows

    async def _writer(self) -> None:
        # Records are written in batches, one store round trip (one SQLite transaction, one
        # Redis pipeline) for all that queued up meanwhile: a write per
        # record cost a fifth of the gateway's CPU per message (bench/cost.py). After the
        # first record the writer lingers up to LINGER seconds (event-loop time: a batching
        # delay, not policy time) unless flush() or a full batch cuts it short.
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + LINGER
            while len(batch) < BATCH_MAX:
                if self._queue.empty():
                    if self._flushing or loop.time() >= deadline:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        pass
                    continue
                batch.append(self._queue.get_nowait())
            try:
                await self.store.set_many([row for rec in batch for row in self._rows(rec)])
            except StoreError as exc:
                log.warning("trace_unavailable", error=str(exc), records=len(batch))
                if self.metrics is not None:
                    self.metrics.trace_dropped.inc(len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _retention(self) -> None:
        while True:
            await self.purge()
            await asyncio.sleep(PURGE_EVERY)

    async def purge(self) -> int:
        """Delete expired keys from a store that keeps them (SQLite); the retention job."""
        purge = getattr(self.store, "purge_expired", None)
        if purge is None:  # Redis expires keys itself
            return 0
        try:
            removed = await purge()
        except StoreError as exc:
            log.warning("trace_purge_failed", error=str(exc))
            return 0
        if removed:
            log.info("trace_purged", keys=removed)
        return removed

    def start(self) -> None:
        if self.enabled:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._writer()), loop.create_task(self._retention())]

    async def flush(self) -> None:
        """Wait until every queued record is written (tests; stop)."""
        if self._tasks:
            await self._drained()

    async def _drained(self) -> None:
        self._flushing += 1
        self._wake.set()
        try:
            await self._queue.join()
        finally:
            self._flushing -= 1

    async def close(self) -> None:
        if self._tasks:
            try:
                await asyncio.wait_for(self._drained(), 5)
            except asyncio.TimeoutError:
                log.warning("trace_not_flushed", queued=self._queue.qsize())
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []

    # --- queries --------------------------------------------------------------------------

    async def _records(self, queue_ids) -> list[dict]:
        out = []
        for qid in dict.fromkeys(queue_ids):
            raw = await self.store.get(f"trace:q:{qid}")
            if raw is not None:
                out.append(json.loads(raw))
        return sorted(out, key=lambda r: r["at"])

    async def query(self, *, queue_id: str | None = None, message_id: str | None = None,
                    sender: str | None = None, since: float | None = None,
                    decision: str | None = None, recipient: str | None = None) -> list[dict]:
        """Records matching one of queue id, Message-ID or sender (within ``since`` seconds,
        default the whole retention), then the filters; oldest first."""
        now = self.clock.now().timestamp()
        if queue_id:
            records = await self._records([queue_id])
        elif message_id:
            keys = await self.store.scan(f"trace:m:{message_id_key(message_id)}:")
            records = await self._records(k.rpartition(":")[2] for k in keys)
        elif sender:
            start = now - (since if since is not None else self.ttl)
            hours, ids = [], []
            t = start - start % 3600
            while t <= now:
                hours.append(_hour(t))
                t += 3600
            for hour in hours:
                keys = await self.store.scan(f"trace:s:{sender}:{hour}:")
                ids += sorted(k.rpartition(":")[2] for k in keys)
            records = await self._records(ids)
        else:
            raise ValueError("a queue id, a Message-ID or a sender is needed")
        if since is not None:
            records = [r for r in records if r["at"] >= now - since]
        if decision:
            records = [r for r in records if r["decision"] == decision]
        if recipient:
            wanted = recipient_hash(self.key, recipient.strip())
            records = [r for r in records if wanted in r["recipients"]]
        return records
