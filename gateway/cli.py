"""The ``gateway`` command: serve, check-config, and the sender registry for administrators."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from gateway.config import Config, load_config
from gateway.typed import ConfigError

DEFAULT_CONFIG = os.environ.get("GATEWAY_CONFIG", "gateway.toml")


def _load(args) -> tuple[Config, "Registry"]:  # noqa: F821
    from gateway.senders import load_registry

    config = load_config(args.config)
    return config, load_registry(config.path(config.senders.dir), config.checks)


def cmd_serve(args) -> int:
    from gateway.app import serve
    from gateway.maillog import configure_logging

    config, _ = _load(args)
    configure_logging(config.logging.level, config.logging.format)
    asyncio.run(serve(config))
    return 0


def cmd_check_config(args) -> int:
    config, registry = _load(args)
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
           "expires": sender.expires.isoformat(),
           "auth": {"username": sender.auth.username} if sender.auth else None,
           "checks": {k: v.mode for k, v in sender.checks.items()}, "file": str(sender.file)}
    print(json.dumps(out, indent=2))
    return 0


def cmd_senders_check(args) -> int:
    config, registry = _load(args)
    print(f"{len(registry)} sender(s) in {config.path(config.senders.dir)}: OK")
    return 0


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_list(values) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def cmd_senders_add(args) -> int:
    from gateway.passwords import generate_password, hash_password
    from gateway.senders import Registry, load_sender

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
    password = None
    if args.auth_username:
        password = generate_password()
        lines += ["", "[auth]", f"username = {_toml_str(args.auth_username)}",
                  f"password_hash = {_toml_str(hash_password(password))}"]
    tmp = directory / f".{args.id}.toml.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    try:
        sender = load_sender(tmp, config.checks)
        Registry([*registry.senders, sender])
    except ConfigError as exc:
        tmp.unlink()
        print(f"error: {exc.key}: {exc.reason}" if exc.key else f"error: {exc.reason}",
              file=sys.stderr)
        return 2
    os.replace(tmp, target)
    print(f"added sender {args.id} ({target})")
    if password:
        print(f"SMTP AUTH username: {args.auth_username}")
        print(f"SMTP AUTH password: {password}")
        print("The password is shown only now; only its hash is stored.")
    return 0


def cmd_senders_remove(args) -> int:
    _, registry = _load(args)
    sender = registry.by_id.get(args.id)
    if sender is None or sender.file is None:
        print(f"no sender with id {args.id!r}", file=sys.stderr)
        return 1
    sender.file.unlink()
    print(f"removed sender {args.id} ({sender.file}); running gateways apply it at restart")
    return 0


def _date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help="configuration file (default: %(default)s, or $GATEWAY_CONFIG)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="configuration file (default: %s)" % DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the gateway").set_defaults(func=cmd_serve)
    sub.add_parser("check-config", parents=[common], help="validate the configuration and "
                   "sender registry without serving").set_defaults(func=cmd_check_config)
    senders = sub.add_parser("senders", parents=[common], help="the sender registry"
                             ).add_subparsers(dest="senders_command", required=True)
    senders.add_parser("list", parents=[common], help="list registered senders"
                       ).set_defaults(func=cmd_senders_list)
    show = senders.add_parser("show", parents=[common], help="show one sender")
    show.add_argument("id")
    show.set_defaults(func=cmd_senders_show)
    senders.add_parser("check", parents=[common], help="validate every sender file; non-zero "
                       "exit on error").set_defaults(func=cmd_senders_check)
    add = senders.add_parser("add", parents=[common],
                             help="register a sender (writes a validated file)")
    add.add_argument("--id", required=True)
    add.add_argument("--organization", required=True)
    add.add_argument("--contact", required=True)
    add.add_argument("--network", action="append", required=True, help="CIDR; repeat")
    add.add_argument("--domain", action="append", required=True, help="repeat")
    add.add_argument("--return-path", action="append", required=True,
                     help="pattern such as bounce-*@em.vendor.example; repeat")
    add.add_argument("--expires", required=True, type=_date, help="YYYY-MM-DD")
    add.add_argument("--auth-username", help="also create SMTP AUTH credentials, printed once")
    add.set_defaults(func=cmd_senders_add)
    remove = senders.add_parser("remove", parents=[common], help="delete a sender's file")
    remove.add_argument("id")
    remove.set_defaults(func=cmd_senders_remove)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "config" in args and args.config:
        args.config = Path(args.config)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
