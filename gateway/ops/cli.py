"""The ``gateway`` command: serve, check-config, and the sender registry for administrators."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

import structlog

from gateway.infra.config import Config, load_config
from gateway.policy.senders import Registry
from gateway.infra.typed import ConfigError

from gateway import __version__

# Where the configuration is looked for when --config is not given, in this order.
SYSTEM_CONFIG = Path("/etc/ecomm-gateway/gateway.toml")
CONFIG_HELP = ("configuration file (default: $GATEWAY_CONFIG, else ./gateway.toml, else "
               f"{SYSTEM_CONFIG})")


def locate_config(given: str | None, environ=os.environ, cwd: Path | None = None,
                  system: Path = SYSTEM_CONFIG) -> tuple[Path, str]:
    """The configuration file to use and where it was found: ``--config``, ``$GATEWAY_CONFIG``,
    ``./gateway.toml``, ``/etc/ecomm-gateway/gateway.toml``, the first given or existing.

    An explicit choice (option or variable) is used even if missing, so that its error names it.
    """
    if given:
        return Path(given), "--config"
    if environ.get("GATEWAY_CONFIG"):
        return Path(environ["GATEWAY_CONFIG"]), "$GATEWAY_CONFIG"
    local = (cwd or Path.cwd()) / "gateway.toml"
    if local.is_file():
        return local, "./gateway.toml"
    if system.is_file():
        return system, str(system)
    raise ConfigError(local, "", f"no configuration found (looked for --config, "
                                 f"$GATEWAY_CONFIG, ./gateway.toml, {system})")


def _load(args) -> tuple[Config, Registry]:
    from gateway.policy.senders import load_registry

    config = load_config(args.config)
    return config, load_registry(config.path(config.senders.dir), config.checks,
                             config.limits.ceiling)


def cmd_serve(args) -> int:
    from gateway.app import StartError, serve
    from gateway.policy.flags import FlagKeyMismatch
    from gateway.infra.event_loop import loop_factory
    from gateway.ops.maillog import configure_logging

    from gateway.ops.preflight import PreflightError

    config, _ = _load(args)
    configure_logging(config.logging.level, config.logging.format)
    structlog.get_logger("gateway").info("configuration", file=str(config.file),
                                         found_by=args.config_source)
    factory, _ = loop_factory(config.server.event_loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(config))
    except PreflightError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except FlagKeyMismatch as exc:
        print(f"error: {config.file}: flags.key_file: {config.path(config.flags.key_file)}: "
              f"{exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"error: {config.file}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args) -> int:
    """Everything ``serve`` checks before it listens, without serving: the configuration, the
    sender registry, and the paths, permissions and keys it would use (gateway.ops.preflight)."""
    from gateway.ops.preflight import PreflightError, check

    config, registry = _load(args)
    try:
        asyncio.run(check(config))
    except PreflightError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{config.file}: OK ({len(registry)} registered sender(s) in "
          f"{config.path(config.senders.dir)})")
    return 0


def cmd_senders_list(args) -> int:
    _, registry = _load(args)
    today = dt.date.today()
    print(f"{'ID':<24} {'ORGANIZATION':<32} {'EXPIRES':<11} {'AUTH':<5} NETWORKS")
    for s in registry.senders:
        state = " (expired)" if s.expired(today) else ""
        print(f"{s.id:<24} {s.organization[:32]:<32} {s.expires.isoformat():<11} "
              f"{'yes' if s.auth else 'no':<5} {', '.join(s.networks)}{state}")
    return 0


def cmd_senders_show(args) -> int:
    _, registry = _load(args)
    sender = registry.by_id.get(args.id)
    if sender is None:
        print(f"no sender with id {args.id!r}", file=sys.stderr)
        return 1
    out = {"id": sender.id, "organization": sender.organization, "contact": sender.contact,
           "description": sender.description, "networks": list(sender.networks),
           "domains": list(sender.domains), "return_path": list(sender.return_path),
           "expires": sender.expires.isoformat(), "classes": list(sender.classes),
           "rate": sender.rate or None, "recipient_rate": sender.recipient_rate or None,
           "dkim_selectors": list(sender.dkim_selectors),
           "auth": {"username": sender.auth.username} if sender.auth else None,
           "checks": {k: v.mode for k, v in sender.checks.items()}, "file": str(sender.file)}
    print(json.dumps(out, indent=2))
    return 0


def cmd_senders_check(args) -> int:
    config, registry = _load(args)
    print(f"{len(registry)} sender(s) in {config.path(config.senders.dir)}: OK")
    return 0


def cmd_senders_verify(args) -> int:
    """Onboarding preflight against DNS (gateway.ops.onboarding); one line per problem."""
    from gateway.infra.clock import SystemClock
    from gateway.infra.dns import Resolver
    from gateway.ops.onboarding import verify

    config, registry = _load(args)
    sender = registry.by_id.get(args.id)
    if sender is None:
        print(f"no sender with id {args.id!r}", file=sys.stderr)
        return 2
    settings = sender.checks.get("sender_auth") or config.check_settings("sender_auth")

    async def run() -> list[str]:
        dns = config.dns
        resolver = Resolver(clock=SystemClock(), nameservers=dns.nameservers,
                            timeout=dns.timeout, cache_size=dns.cache_size, threads=dns.threads)
        try:
            return await verify(sender, resolver, today=dt.datetime.now(dt.timezone.utc).date(),
                                receiver=config.server.hostname,
                                min_rsa_bits=settings.min_rsa_bits,
                                spf_time_limit=settings.spf_time_limit)
        finally:
            await resolver.close()

    problems = asyncio.run(run())
    for line in problems:
        print(line)
    if problems:
        return 1
    checked = [f"SPF of {len(sender.domains)} domain(s) for {len(sender.networks)} network(s)",
               f"{len(sender.dkim_selectors)} DKIM selector(s)", "return-path domains",
               "expiry"]
    print(f"{sender.id}: ready ({', '.join(checked)})")
    return 0


def audit_cli(config: Config, action: str, **changed) -> int:
    """Record a CLI action in the audit trail ([logging] audit_file) with the OS user; 0, or 1
    (and why, on stderr) when the action was done but could not be recorded."""
    from gateway.ops import audit

    path = config.path(config.logging.audit_file)
    try:
        audit.record(path, action, audit.cli_actor(), **changed)
    except OSError as exc:
        print(f"error: done, but not recorded in the audit trail {path}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_list(values) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def cmd_senders_add(args) -> int:
    from gateway.policy.passwords import generate_password, hash_password
    from gateway.policy.senders import Registry, check_ceiling, load_sender

    config, registry = _load(args)
    directory = config.path(config.senders.dir)
    target = directory / f"{args.id}.toml"
    if target.exists() or args.id in registry.by_id:
        print(f"sender {args.id!r} already exists ({target})", file=sys.stderr)
        return 1
    lines = [
        f"# Registered {dt.date.today().isoformat()} with `gateway senders add`.",
        f"id = {_toml_str(args.id)}",
        f"organization = {_toml_str(args.organization)}",
        f"contact = {_toml_str(args.contact)}",
        f"networks = {_toml_list(args.network)}",
        f"domains = {_toml_list(args.domain)}",
        f"return_path = {_toml_list(args.return_path)}",
        f"expires = {args.expires}",
    ]
    if args.description:
        lines.insert(4, f"description = {_toml_str(args.description)}")
    if args.message_class:
        lines.append(f"classes = {_toml_list(dict.fromkeys(args.message_class))}")
    if args.rate:
        lines.append(f"rate = {_toml_str(args.rate)}")
    if args.recipient_rate:
        lines.append(f"recipient_rate = {_toml_str(args.recipient_rate)}")
    if args.dkim_selector:
        lines.append(f"dkim_selectors = {_toml_list(args.dkim_selector)}")
    password = None
    if args.auth_username:
        password = generate_password()
        lines += ["", "[auth]", f"username = {_toml_str(args.auth_username)}",
                  f"password_hash = {_toml_str(hash_password(password))}"]
    tmp = directory / f".{args.id}.toml.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    try:
        sender = load_sender(tmp, config.checks)
        check_ceiling(sender, config.limits.ceiling)
        Registry([*registry.senders, sender])
    except ConfigError as exc:
        tmp.unlink()
        print(f"error: {exc.key}: {exc.reason}" if exc.key else f"error: {exc.reason}",
              file=sys.stderr)
        return 2
    os.replace(tmp, target)
    print(f"added sender {args.id} ({target}); {_apply_running(args)}")
    audited = audit_cli(config, "sender_add", sender=args.id, file=str(target),
                        organization=args.organization, networks=args.network,
                        domains=args.domain, return_path=args.return_path, expires=args.expires,
                        auth_username=args.auth_username)
    if password:
        print(f"SMTP AUTH username: {args.auth_username}")
        print(f"SMTP AUTH password: {password}")
        print("The password is shown only now; only its hash is stored.")
    return audited


def cmd_senders_remove(args) -> int:
    config, registry = _load(args)
    sender = registry.by_id.get(args.id)
    if sender is None or sender.file is None:
        print(f"no sender with id {args.id!r}", file=sys.stderr)
        return 1
    sender.file.unlink()
    print(f"removed sender {args.id} ({sender.file}); {_apply_running(args)}")
    return audit_cli(config, "sender_remove", sender=args.id, file=str(sender.file),
                     organization=sender.organization)


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class Unreachable(SystemExit):
    """The running gateway's admin listener did not answer."""


def _admin_call(args, method: str, path: str, body: dict | None = None, *,
                accept: tuple[int, ...] = (), timeout: float = 10) -> dict:
    """Call the running gateway's admin API (the [admin] listener, token from token_file)."""
    import urllib.error
    import urllib.request

    from gateway.infra.config import parse_hostport

    config = load_config(args.config)
    host, port = parse_hostport(config.admin.listen)
    token_file = config.path(config.admin.token_file)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise Unreachable(f"error: cannot read the admin token {token_file}: {exc.strerror} "
                          "(is the gateway running with this configuration?)") from None
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(
        f"http://{host}:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 "X-Gateway-Actor": f"cli:{_os_user()}",
                 "X-Gateway-OS-User": _os_user()})  # the audit trail: the OS user next to the token
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code in accept:
            return json.loads(detail)
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError):
            pass
        raise SystemExit(f"error: {detail}") from None
    except OSError as exc:
        raise Unreachable(f"error: cannot reach the admin listener {host}:{port}: {exc}") from None


def _print_reload(result: dict, out=sys.stdout) -> None:
    if not result["applied"]:
        err = result["error"]
        print(f"reload refused, the running configuration stays: {err['message']}",
              file=sys.stderr)
        return
    senders = result["senders"]
    parts = [f"{name} {', '.join(ids)}" for name, ids in senders.items() if ids]
    print(f"reloaded: generation {result['generation']}; "
          f"{'; '.join(parts) if parts else 'no sender changed'}; "
          f"{'changed ' + ', '.join(result['changed']) if result['changed'] else 'no key changed'}",
          file=out)
    if result["restart_needed"]:
        print(f"needs a restart to apply: {', '.join(result['restart_needed'])}", file=out)


def cmd_reload(args) -> int:
    """Ask the running gateway to re-read gateway.toml and the sender files."""
    result = _admin_call(args, "POST", "/api/reload", accept=(422,), timeout=60)
    _print_reload(result)
    return 0 if result["applied"] else 1


def _apply_running(args) -> str:
    """After a sender file changed: have the running gateway reload; what happened, in words."""
    try:
        result = _admin_call(args, "POST", "/api/reload", accept=(422,), timeout=60)
    except Unreachable:
        return "no running gateway answered; it applies at the next start or reload"
    except SystemExit as exc:
        return f"the running gateway did not reload ({str(exc.code).removeprefix('error: ')})"
    if result["applied"]:
        return f"the running gateway applied it (generation {result['generation']})"
    return ("the running gateway refused the reload and keeps its configuration: "
            f"{result['error']['message']}")


def cmd_explain(args) -> int:
    """The real pipeline on one message, without relaying, spending or writing anything."""
    from gateway.ops.explain import BadInput, explain, parse_at, read_message

    config, registry = _load(args)
    try:
        message = read_message(Path(args.message))
        at = parse_at(args.at)
        result = asyncio.run(explain(config, registry, message=message,
                                     client_ip=args.client_ip, mail_from=args.mail_from,
                                     recipients=args.rcpt, auth=args.auth, helo=args.helo,
                                     tls=args.tls, at=at))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0 if result.relayed else 1


def cmd_trace(args) -> int:
    """Decisions kept by the running gateway (its state store), through the admin API."""
    from urllib.parse import urlencode

    query = {k: v for k, v in (("queue_id", args.queue_id), ("message_id", args.message_id),
                                ("sender", args.sender), ("since", args.since),
                                ("decision", args.decision), ("recipient", args.recipient))
             if v}
    answer = _admin_call(args, "GET", "/api/trace?" + urlencode(query))
    records = answer["decisions"]
    if not answer.get("days"):
        print("the running gateway keeps no trace ([trace] days = 0)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
        return 0 if records else 1
    if not records:
        print("no decision found", file=sys.stderr)
        return 1
    for r in records:
        when = dt.datetime.fromtimestamp(r["at"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{when} UTC  {r['queue_id']}  {r['sender'] or '-'}  {r['decision']} "
              f"({r['reason']}) at {r['stage']}  from [{r['client_ip']}] <{r['mail_from']}>  "
              f"message-id {r['message_id'] or '-'}  {len(r['recipients'])} recipient(s)  "
              f"reply: {r['reply'] or '-'}")
        if r.get("checks_ms"):
            print("    checks: " + ", ".join(f"{k} {v:g} ms" for k, v in r["checks_ms"].items()))
    return 0


def cmd_throttle_set(args) -> int:
    body = {"rate": args.rate, "for": args.duration}
    result = _admin_call(args, "PUT", f"/api/throttles/{args.target}", body)
    until = (f" until {dt.datetime.fromtimestamp(result['until'], dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
             if result["until"] else " until cleared")
    print(f"throttled {result['target']} to {result['rate']}{until}")
    return 0


def cmd_throttle_list(args) -> int:
    throttles = _admin_call(args, "GET", "/api/throttles")["throttles"]
    if not throttles:
        print("no throttles")
    for t in throttles:
        until = (f"{dt.datetime.fromtimestamp(t['until'], dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
                 if t["until"] else "until cleared")
        print(f"{t['target']:<24} {t['rate']:<14} {until}")
    return 0


def cmd_throttle_clear(args) -> int:
    result = _admin_call(args, "DELETE", f"/api/throttles/{args.target}")
    print(f"cleared the throttle of {result['target']}" if result["cleared"]
          else f"{result['target']} had no throttle")
    return 0


def _quarantine(args):
    from gateway.policy.quarantine import Quarantine

    config = load_config(args.config)
    return config, Quarantine(config.path(config.quarantine.dir))


def cmd_quarantine_list(args) -> int:
    _, quarantine = _quarantine(args)
    items = quarantine.list()
    if not items:
        print("the quarantine is empty")
        return 0
    print(f"{'ID':<14} {'STORED (UTC)':<20} {'SENDER':<16} {'REASON':<16} {'RCPTS':>5}  SUBJECT")
    for i in items:
        print(f"{i.id:<14} {i.stored_at[:19].replace('T', ' '):<20} {(i.sender or '-')[:16]:<16} "
              f"{i.reason[:16]:<16} {len(i.recipients):>5}  {i.subject[:60]}")
    return 0


def cmd_quarantine_show(args) -> int:
    from dataclasses import asdict

    from gateway.policy.quarantine import QuarantineError

    _, quarantine = _quarantine(args)
    try:
        item, content = quarantine.get(args.id)
    except QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(item), indent=2))
    head, _, body = content.partition(b"\r\n\r\n")
    print()
    print(head.decode("utf-8", "replace").replace("\r\n", "\n"))
    if args.body:
        print()
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
    else:
        print(f"\n({len(body)} bytes of body; --body shows it)")
    return 0


def cmd_quarantine_release(args) -> int:
    from gateway.infra.clock import SystemClock
    from gateway.policy.quarantine import QuarantineError
    from gateway.relay import open_upstream

    config, quarantine = _quarantine(args)

    async def release():
        upstream = open_upstream(config, SystemClock())
        try:
            return await quarantine.release(args.id, upstream)
        finally:
            await upstream.close()

    try:
        item, _ = quarantine.get(args.id)
        reply, refused = asyncio.run(release())
    except QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for rcpt, r in refused:
        print(f"refused <{rcpt}>: {r}", file=sys.stderr)
    if not reply.ok:
        print(f"not released: campus mail replied {reply}", file=sys.stderr)
        return 1
    kept = " (kept for the refused recipients)" if refused else ""
    print(f"released {args.id}: {reply}{kept}")
    return audit_cli(config, "quarantine_release", id=args.id, sender=item.sender,
                     reason=item.reason, reply=f"{reply.code} {reply.enhanced}",
                     recipients=len(item.recipients), refused=len(refused))


def cmd_quarantine_delete(args) -> int:
    from gateway.policy.quarantine import QuarantineError

    config, quarantine = _quarantine(args)
    try:
        item, _ = quarantine.get(args.id)
        quarantine.delete(args.id)
    except QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"deleted {args.id}")
    return audit_cli(config, "quarantine_delete", id=item.id, sender=item.sender,
                     reason=item.reason, recipients=len(item.recipients))


def _rate(text: str) -> str:
    from gateway.policy.rates import Rate

    try:
        return str(Rate.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    from gateway.policy.senders import MESSAGE_CLASSES

    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("--config", "-c", default=None, help=CONFIG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the gateway").set_defaults(func=cmd_serve)
    sub.add_parser("check-config", parents=[common], help="validate the configuration and "
                   "sender registry without serving").set_defaults(func=cmd_check_config)
    senders = sub.add_parser("senders", parents=[common], help="the sender registry"
                             ).add_subparsers(dest="senders_command", required=True,
                                              metavar="SUBCOMMAND")
    senders.add_parser("list", parents=[common], help="list registered senders"
                       ).set_defaults(func=cmd_senders_list)
    show = senders.add_parser("show", parents=[common], help="show one sender as JSON")
    show.add_argument("id", help="the sender's id")
    show.set_defaults(func=cmd_senders_show)
    senders.add_parser("check", parents=[common], help="validate every sender file; non-zero "
                       "exit on error").set_defaults(func=cmd_senders_check)
    verify = senders.add_parser("verify", parents=[common], help="onboarding preflight against "
                                "DNS: SPF, DKIM keys, return-path, expiry; non-zero exit on "
                                "a problem")
    verify.add_argument("id", help="the sender's id")
    verify.set_defaults(func=cmd_senders_verify)
    add = senders.add_parser("add", parents=[common],
                             help="register a sender (writes a validated file)")
    add.add_argument("--id", required=True, help="short unique id: lower-case letters, digits, "
                     ". _ -")
    add.add_argument("--organization", required=True, help="who sends (shown to administrators)")
    add.add_argument("--contact", required=True, help="whom to contact about this sender")
    add.add_argument("--description", help="what the sender sends, for administrators")
    add.add_argument("--network", action="append", required=True,
                     help="an originating network as a CIDR; repeat for each")
    add.add_argument("--domain", action="append", required=True,
                     help="a domain the sender may use (envelope, From:, DKIM d=); repeat")
    add.add_argument("--return-path", action="append", required=True,
                     help="pattern such as bounce-*@em.vendor.example; repeat")
    add.add_argument("--expires", required=True, type=_date,
                     help="last day of the policy exception, YYYY-MM-DD")
    add.add_argument("--class", dest="message_class", action="append", choices=MESSAGE_CLASSES,
                     help="a message class the sender may send; repeat (default: promotional)")
    add.add_argument("--rate", type=_rate, help="its own message rate below [limits] "
                     "sender_rate, e.g. 10/minute")
    add.add_argument("--recipient-rate", type=_rate, help="its own recipients rate, e.g. "
                     "2000/minute")
    add.add_argument("--dkim-selector", action="append", help="a DKIM selector it signs with "
                     "(checked by `senders verify`); repeat")
    add.add_argument("--auth-username", help="also create SMTP AUTH credentials, printed once")
    add.set_defaults(func=cmd_senders_add)
    remove = senders.add_parser("remove", parents=[common], help="delete a sender's file")
    remove.add_argument("id", help="the sender's id")
    remove.set_defaults(func=cmd_senders_remove)
    sub.add_parser("reload", parents=[common], help="have the running gateway re-read "
                   "gateway.toml and the sender files (all or nothing; exit 1 if refused)"
                   ).set_defaults(func=cmd_reload)
    exp = sub.add_parser("explain", parents=[common], help="run the real checks on a message "
                         "without relaying it: every check's mode, verdict, reason and time, "
                         "then the reply (exit 0 relayed, 1 refused or deferred, 2 bad input)")
    exp.add_argument("message", help="the message file (.eml); bare LF line ends become CRLF")
    exp.add_argument("--client-ip", required=True, help="the IP address the vendor sends from")
    exp.add_argument("--mail-from", required=True, help="the envelope sender (return-path); "
                     "\"\" for the null path")
    exp.add_argument("--rcpt", action="append", required=True, help="an envelope recipient; "
                     "repeat")
    exp.add_argument("--auth", help="decide as if the client authenticated as this SMTP AUTH "
                     "user name")
    exp.add_argument("--helo", default="", help="the HELO/EHLO name (default: none)")
    exp.add_argument("--tls", action="store_true", help="as if the session used STARTTLS")
    exp.add_argument("--at", help="decide at this time, ISO 8601 (default: now; no zone: UTC), "
                     "e.g. 2026-11-02T09:30:00-07:00")
    exp.add_argument("--json", action="store_true", help="the result as JSON")
    exp.set_defaults(func=cmd_explain)
    trace = sub.add_parser("trace", parents=[common], help="decisions the running gateway kept "
                           "([trace] days), by queue id, Message-ID or sender; exit 1 if none")
    which = trace.add_mutually_exclusive_group(required=True)
    which.add_argument("--queue-id", help="the queue id (in the reply, the log, the status page)")
    which.add_argument("--message-id", help="the Message-ID, with or without <>")
    which.add_argument("--sender", help="a sender id (with --since: its recent decisions)")
    trace.add_argument("--since", help="only decisions this recent, e.g. 2h, 30m, 1d")
    trace.add_argument("--decision", choices=("accept", "reject", "defer", "quarantine"),
                       help="only decisions of this kind")
    trace.add_argument("--recipient", help="only messages to this address (matched by its "
                       "keyed hash; the address is never stored)")
    trace.add_argument("--json", action="store_true", help="the records as JSON")
    trace.set_defaults(func=cmd_trace)
    throttle = sub.add_parser("throttle", parents=[common], help="run-time throttles, through "
                              "the running gateway's admin API").add_subparsers(
        dest="throttle_command", required=True, metavar="SUBCOMMAND")
    tset = throttle.add_parser("set", parents=[common], help="lower a sender's rate (or the "
                               "gateway-wide one, target 'global') without a restart")
    tset.add_argument("target", help="a sender id, or 'global'")
    tset.add_argument("rate", type=_rate, help="e.g. 10/minute")
    tset.add_argument("--for", dest="duration", help="how long, e.g. 2h, 30m (default: until "
                      "cleared)")
    tset.set_defaults(func=cmd_throttle_set)
    throttle.add_parser("list", parents=[common], help="throttles in force"
                        ).set_defaults(func=cmd_throttle_list)
    tclear = throttle.add_parser("clear", parents=[common], help="remove a throttle")
    tclear.add_argument("target", help="a sender id, or 'global'")
    tclear.set_defaults(func=cmd_throttle_clear)
    quarantine = sub.add_parser("quarantine", parents=[common], help="messages kept in the "
                                "quarantine (not relayed)").add_subparsers(
        dest="quarantine_command", required=True, metavar="SUBCOMMAND")
    quarantine.add_parser("list", parents=[common], help="list quarantined messages"
                          ).set_defaults(func=cmd_quarantine_list)
    qshow = quarantine.add_parser("show", parents=[common], help="envelope, decision and "
                                  "header of one message")
    qshow.add_argument("id", help="the quarantine id (from list)")
    qshow.add_argument("--body", action="store_true", help="also print the body")
    qshow.set_defaults(func=cmd_quarantine_show)
    qrelease = quarantine.add_parser("release", parents=[common], help="relay to campus mail "
                                     "with the original envelope, then remove")
    qrelease.add_argument("id", help="the quarantine id (from list)")
    qrelease.set_defaults(func=cmd_quarantine_release)
    qdelete = quarantine.add_parser("delete", parents=[common], help="remove without relaying")
    qdelete.add_argument("id", help="the quarantine id (from list)")
    qdelete.set_defaults(func=cmd_quarantine_delete)
    from gateway.ops.flags_cli import add_parser as add_flags_parser

    add_flags_parser(sub, common)  # gateway flags import | remove | check | list | export-optouts
    from gateway.ops.arc_cli import add_parser as add_arc_parser

    add_arc_parser(sub, common)  # gateway arc keygen
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.config, args.config_source = locate_config(getattr(args, "config", None))
        if args.config_source != "--config":  # say which file, when it was not named
            print(f"gateway: configuration {args.config} (from {args.config_source})",
                  file=sys.stderr)
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
