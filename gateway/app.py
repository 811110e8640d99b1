"""The one wiring file: configuration in, a running gateway out."""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl
import weakref
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.policy.adaptive import AdaptiveRate
from gateway.message.arc import ArcKeyError, ArcSealer
from gateway.ops import audit
from gateway.ops.audit import api_tokens
from gateway.checks import CHECKS
from gateway.infra.event_loop import running_loop_name, tune_gc
from gateway.checks.base import Deps
from gateway.checks.pipeline import Pipeline
from gateway.infra.clock import Clock, SystemClock
from gateway.infra.config import POLICY_SENDER_RATE, Config, parse_hostport
from gateway.infra.dns import Resolver
from gateway.engine import Engine
from gateway.engine.generation import Generation
from gateway.engine.sessions import SessionCounts
from gateway.policy.flags import open_flags
from gateway.ops.logfile import LogFile
from gateway.ops.maillog import MailLog, load_hash_key, load_token
from gateway.ops.metrics import Metrics
from gateway.milter.server import MilterServer
from gateway.ops.monitor import Monitor, static_metrics
from gateway.policy.quarantine import Quarantine
from gateway.ops.recent import Recent
from gateway.ops.trace import TraceStore
from gateway.ops.reload import Reloader, ReloadResult
from gateway.policy.rates import Rate
from gateway.policy.throttles import Throttles
from gateway.infra.typed import ConfigError
from gateway.relay import open_upstream
from gateway.policy.senders import Registry, load_registry
from gateway.smtp.handler import Handler
from gateway.smtp.server import GatewaySMTP
from gateway.state import StoreError, open_store
from gateway.ops.unsubscribe_endpoint import UnsubscribeEndpoint

log = structlog.get_logger("gateway")


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    if config.server.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.path(config.server.tls_cert)),
                        str(config.path(config.server.tls_key)))
    return ctx


@dataclass
class Gateway:
    config: Config
    registry: Registry
    clock: Clock = field(default_factory=SystemClock)
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    log_file: LogFile | None = None  # [logging] file, reopened on SIGUSR1

    def __post_init__(self) -> None:
        cfg = self.config
        self.metrics = Metrics(self.metrics_registry)
        self.store = open_store(cfg.state.url, self.clock, cfg.base_dir)
        # the SMTP front relays to campus mail; behind an MTA (milter only) the MTA delivers
        self.upstream = open_upstream(cfg, self.clock) if cfg.server.listen else None
        hash_key = load_hash_key(cfg.path(cfg.logging.hash_key_file))
        self.maillog = MailLog(hash_key, clear_recipients=cfg.logging.recipients == "clear",
                               level=cfg.logging.level)
        self.adaptive = self._adaptive_rate()
        self.dns = Resolver(clock=self.clock, nameservers=cfg.dns.nameservers,
                            timeout=cfg.dns.timeout, cache_size=cfg.dns.cache_size,
                            threads=cfg.dns.threads, metrics=self.metrics)
        self.quarantine = Quarantine(cfg.path(cfg.quarantine.dir))
        self.throttles = Throttles(self.store, self.clock, cfg.limits.throttle_refresh)
        self.admin_token = load_token(cfg.path(cfg.admin.token_file))
        self.api_tokens = api_tokens(cfg, self.admin_token)  # name -> token ([admin] token_dir)
        self.audit_file = cfg.path(cfg.logging.audit_file)
        self.flags = open_flags(cfg, self.store)  # recipient flags, keyed with [flags] key_file
        self.unsubscribe = UnsubscribeEndpoint(config=cfg, flags=self.flags,
                                               registry=self.registry, clock=self.clock,
                                               maillog=self.maillog, metrics=self.metrics)
        self.hash_key = hash_key
        generation = self.build_generation(cfg, self.registry)
        self.engine = Engine(config=cfg, registry=self.registry, pipeline=generation.pipeline,
                             clock=self.clock, maillog=self.maillog, metrics=self.metrics)
        # sessions per IP and per sender, counted across both fronts
        self.counts = SessionCounts(cfg.limits, self.metrics)
        arc = self._arc_sealer()
        self.handler = Handler(engine=self.engine, upstream=self.upstream, maillog=self.maillog,
                               metrics=self.metrics, adaptive=self.adaptive, store=self.store,
                               arc=arc, counts=self.counts) \
            if self.upstream is not None else None
        self.milter = MilterServer(config=cfg, engine=self.engine, maillog=self.maillog,
                                   metrics=self.metrics, counts=self.counts, arc=arc) \
            if cfg.milter.listen else None
        self.reloader = Reloader(self)
        self.recent = Recent(self.clock)  # the last hour's decisions, for the status page
        self.trace = TraceStore(self.store, hash_key, self.clock, cfg.trace.days, self.metrics)
        self.engine.decisions.observers += [self.recent.observe, self.trace.observe]
        self.monitor = Monitor(self)  # upstream probes, quarantine size, state store health
        self.servers: list[asyncio.AbstractServer] = []
        self.sessions: weakref.WeakSet[GatewaySMTP] = weakref.WeakSet()
        self.admin_runner: web.AppRunner | None = None
        self.smtp_addresses: list[tuple[str, int]] = []
        self.admin_address: tuple[str, int] | None = None

    def _arc_sealer(self) -> ArcSealer | None:
        """The ARC sealer when ``[arc] domain`` is set; its key is read now, so a missing or
        unusable key_file stops the start naming the file and key."""
        if not self.config.arc.domain:
            return None
        try:
            return ArcSealer(self.config, self.dns, self.clock, self.metrics)
        except ArcKeyError as exc:
            raise ConfigError(self.config.file, "arc.key_file", str(exc)) from None

    @property
    def pipeline(self) -> Pipeline:
        return self.engine.pipeline

    def build_generation(self, config: Config, registry: Registry, number: int = 0,
                         previous: Generation | None = None) -> Generation:
        """The checks built for ``config`` and ``registry``, on the gateway's shared state,
        resolver, throttles and metrics (at start, and for each reload: then each check takes
        over the run-time state of its ``previous`` self)."""
        deps = Deps(config=config, registry=registry, clock=self.clock, state=self.store,
                    metrics=self.metrics, adaptive=self.adaptive, throttles=self.throttles,
                    dns=self.dns, quarantine=self.quarantine, recipient_key=self.hash_key,
                    flags=self.flags)
        checks = [c(deps) for c in CHECKS]
        if previous is not None:
            # by class: two halves of one control (rate_limit at MAIL and DATA) share a name
            before = {type(c): c for stage in previous.pipeline.by_stage.values() for c in stage}
            for check in checks:
                if type(check) in before:
                    check.inherit(before[type(check)])
        pipeline = Pipeline(checks, deps, observe=self.metrics.check_observed)
        return Generation(config, registry, pipeline, number)

    def switch(self, generation: Generation) -> None:
        """New transactions (and sessions) from now on use ``generation``; those in progress
        keep theirs."""
        self.config, self.registry = generation.config, generation.registry
        self.unsubscribe.registry = generation.registry
        self.engine.switch(generation)
        static_metrics(self)  # registration expiries of the senders now registered

    async def reload(self, actor: str, audit_actor: dict | None = None) -> ReloadResult:
        """Re-read gateway.toml and the sender files; all or nothing (gateway.ops.reload). Applied
        or refused, it is an administrative action: one event in the audit trail."""
        result = await self.reloader.reload(actor)
        changed: dict = {"applied": result.applied, "generation": result.generation}
        if result.applied:
            changed.update(keys=result.changed, restart_needed=result.restart_needed,
                           senders=result.senders.to_json())
        else:
            changed.update(file=result.error.file, key=result.error.key,
                           reason=result.error.reason)
        try:
            await asyncio.to_thread(audit.record, self.audit_file, "reload",
                                    audit_actor or {"actor": actor}, **changed)
        except OSError as exc:  # reloaded (or not) all the same: say the trail missed it
            log.error("audit_write_failed", path=str(self.audit_file), error=exc.strerror)
        return result

    def reloaded(self, result: ReloadResult, actor: str) -> None:
        """Log and count a reload: an administrative action, with its actor."""
        if result.applied:
            self.metrics.reloads.labels("applied").inc()
            self.metrics.config_generation.set(result.generation)
            log.warning("reload", actor=actor, result="applied", generation=result.generation,
                        changed=result.changed, restart_needed=result.restart_needed,
                        senders=result.senders.to_json())
        else:
            self.metrics.reloads.labels("refused").inc()
            err = result.error
            log.error("reload", actor=actor, result="refused", generation=result.generation,
                      file=err.file, key=err.key, reason=err.reason)

    def _adaptive_rate(self) -> AdaptiveRate | None:
        limits = self.config.limits
        if not limits.adaptive:
            return None

        def changed(rate: Rate, why: str) -> None:
            self.metrics.adaptive_rate.set(rate.per_second)
            self.metrics.adaptive_changes.labels(why).inc()
            log.warning("adaptive_rate", rate=str(rate), reason=why)

        adaptive = AdaptiveRate(Rate.parse(limits.global_rate), Rate.parse(limits.adaptive_floor),
                                limits.adaptive_decrease, limits.adaptive_increase,
                                limits.adaptive_interval, limits.adaptive_latency, self.clock,
                                on_change=changed)
        self.metrics.adaptive_rate.set(adaptive.rate.per_second)
        return adaptive

    def _protocol(self, tls: ssl.SSLContext | None) -> GatewaySMTP:
        s = self.config.server
        protocol = GatewaySMTP(self.handler, hostname=s.hostname, ident="ESMTP ecomm-gateway",
                               data_size_limit=s.max_message_size, tls_context=tls,
                               require_starttls=s.require_tls, auth_require_tls=True,
                               timeout=s.timeout, loop=asyncio.get_running_loop(),
                               transaction_idle=self.config.upstream.transaction_idle)
        self.sessions.add(protocol)
        return protocol

    async def start(self) -> None:
        from gateway.ops.admin import admin_app

        await self.store.ping()
        self.trace.start()
        await self.flags.check_key()  # a lost or swapped key file would void every flag
        tls = server_tls_context(self.config)
        loop = asyncio.get_running_loop()
        for item in self.config.server.listen:
            host, port = parse_hostport(item)
            server = await loop.create_server(lambda: self._protocol(tls),
                                              host=None if host == "*" else host, port=port)
            self.servers.append(server)
            self.smtp_addresses += [sock.getsockname()[:2] for sock in server.sockets]
        if self.milter is not None:
            await self.milter.start()
        self.admin_runner = web.AppRunner(admin_app(self), access_log=None)
        await self.admin_runner.setup()
        host, port = parse_hostport(self.config.admin.listen)
        site = web.TCPSite(self.admin_runner, host, port)
        await site.start()
        self.admin_address = site._server.sockets[0].getsockname()[:2]
        self.monitor.start()
        if self.config.limits.above_policy:
            log.warning("above_policy", file=str(self.config.file),
                        sender_rate=self.config.limits.sender_rate, policy=POLICY_SENDER_RATE,
                        reason="[limits] allow_above_policy = true")
        log.info("started", config=str(self.config.file),
                 smtp=[f"{h}:{p}" for h, p in self.smtp_addresses],
                 milter=self.milter.addresses if self.milter is not None else [],
                 admin=f"{self.admin_address[0]}:{self.admin_address[1]}",
                 upstream=self.upstream.description if self.upstream is not None else None,
                 state=self.config.state.url,
                 senders=len(self.registry), event_loop=running_loop_name(),
                 gc_threshold=list(gc.get_threshold()))
        if self.config.server.event_loop not in ("auto", running_loop_name()):
            log.warning("event_loop_unavailable", configured=self.config.server.event_loop,
                        running=running_loop_name(),
                        hint="pip install uvloop (a dependency of ecomm-gateway on Linux "
                             "and macOS)")

    async def readiness_problems(self) -> list[str]:
        problems = []
        if self.config.server.listen and not self.servers:
            problems.append("smtp not listening")
        if self.milter is not None and not self.milter.servers:
            problems.append("milter not listening")
        try:
            await asyncio.wait_for(self.store.ping(), 2)
        except Exception as exc:  # any failure means not ready; say which
            problems.append(f"state: {exc}")
        upstream = self.monitor.readiness_problem()
        if upstream:
            problems.append(f"upstream: {upstream}")
        return problems

    def reopen_log(self) -> None:
        """SIGUSR1: reopen ``[logging] file`` (logrotate moved it)."""
        if self.log_file is None:
            log.info("sigusr1_ignored", reason="no [logging] file to reopen")
            return
        try:
            self.log_file.reopen()
        except OSError as exc:  # keep writing to the old file; say why
            log.error("log_reopen_failed", path=str(self.log_file.path), error=exc.strerror)
            return
        log.info("log_reopened", path=str(self.log_file.path))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening; let transactions in progress finish (up to ``grace`` seconds), so
        that no vendor is left without the reply to a message campus mail may have taken."""
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            busy = [p for p in self.sessions if p.transport is not None and p.in_transaction]
            for p in self.sessions:
                if p.transport is not None and p not in busy:
                    p.transport.close()
            if not busy or loop.time() >= deadline:
                for p in busy:
                    p.transport.close()
                break
            await asyncio.sleep(0.05)
        # let the closed sessions' handler tasks finish unwinding before the loop goes away
        tasks = [t for p in self.sessions if (t := p._handler_coroutine) and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self.milter is not None:
            await self.milter.stop(grace)
        if self.handler is not None:
            await self.handler.drain()
        await self.trace.close()
        await self.monitor.stop()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        await self.unsubscribe.close()
        if self.upstream is not None:
            await self.upstream.close()
        await self.dns.close()
        await self.store.close()
        log.info("stopped")


class StartError(Exception):
    """The gateway could not start (a port in use, a path it cannot write, a store it cannot
    reach); str() is the one line an administrator needs."""


async def serve(config: Config) -> None:
    from gateway.ops import preflight

    registry = load_registry(config.path(config.senders.dir), config.checks,
                             config.limits.ceiling)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()
    running: list[Gateway] = []  # the gateway, once it has started

    def hangup() -> None:  # SIGHUP: reload gateway.toml and the sender files
        if not running:
            log.warning("reload", actor="signal:SIGHUP", result="ignored",
                        reason="the gateway is still starting")
            return
        task = loop.create_task(running[0].reload("signal:SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # the one place where signals are wired, before the start: no signal is ever fatal
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    # SIGUSR1 (logrotate's postrotate): reopen [logging] file
    loop.add_signal_handler(signal.SIGUSR1, lambda: running[0].reopen_log() if running
                            else log.info("sigusr1_ignored", reason="the gateway is starting"))
    await preflight.check(config)  # the same checks as check-config: path, permission, key
    log_file = None
    if config.logging.file is not None:  # from here on the log goes to the file
        from gateway.ops.logfile import LogFile
        from gateway.ops.maillog import configure_logging

        log_file = LogFile(config.path(config.logging.file))
        configure_logging(config.logging.level, config.logging.format, log_file, serving=True)
    tune_gc()  # the process's, so only here (the tests' in-process gateways keep theirs)
    gateway = None
    try:
        gateway = Gateway(config, registry, log_file=log_file)
        await gateway.start()
    except (OSError, StoreError) as exc:
        if gateway is not None:
            await gateway.stop(grace=0)
        raise StartError(f"cannot start: {exc}") from exc
    running.append(gateway)
    await stop.wait()
    if reloads:
        await asyncio.wait(reloads)
    await gateway.stop()
