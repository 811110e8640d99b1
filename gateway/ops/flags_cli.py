"""``gateway flags ...``: recipient flags for administrators (policy IV.C.1.b FERPA, IV.C.4.a Do
Not Email / Do Not Contact, IV.C.4.b preferences; IV.B.3 exception process item 8, opt-outs back
to the system of record).

An offline tool like ``gateway senders``: it reads gateway.toml and works on the state store
(``sqlite:`` or ``redis://``) and ``[flags] key_file`` directly; running gateways see the change
at their next look-up (flags are not cached between messages).

    gateway flags import --flag ferpa ferpa.csv --replace      # nightly export, swapped in whole
    gateway flags import --flag opt_out --sender acme opt-outs.csv --column email
    gateway flags remove --flag do_not_email alice@example.edu
    gateway flags check alice@example.edu
    gateway flags list
    gateway flags export-optouts --output optouts.csv
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.infra.config import Config, load_config
from gateway.policy.flags import (KINDS, RULES, SCOPED, FlagKeyMismatch, FlagStore, Scope, load_keys,
                           parse_set_name, rule_of, set_name)
from gateway.policy.flags_csv import CSVFormatError, read_addresses, write_optouts
from gateway.message.address import AddressError
from gateway.state import StoreError, open_store

SHOWN_BAD = 50  # bad rows listed one by one; the rest are counted


def _store(config: Config) -> FlagStore:
    if config.state.url == "memory:":
        raise SystemExit("error: [state] url is memory: - flags need a lasting store "
                         "(sqlite:PATH or redis://)")
    from gateway.infra.clock import SystemClock

    return FlagStore(open_store(config.state.url, SystemClock(), config.base_dir),
                     load_keys(config))


def _run(config: Config, work) -> int:
    """Run ``work(flags)`` against the store, turning store and key problems into messages."""
    async def main():
        flags = _store(config)
        try:
            await flags.check_key()
            return await work(flags)
        finally:
            await flags.store.close()

    try:
        return asyncio.run(main())
    except FlagKeyMismatch as exc:
        print(f"error: {config.path(config.flags.key_file)}: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: state store unavailable: {exc}", file=sys.stderr)
        return 2


def _scope(args, config: Config) -> Scope:
    try:
        scope = Scope.of(sender=args.sender, organization=args.organization)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if scope.kind != "global" and args.flag not in SCOPED:
        raise SystemExit(f"error: --sender and --organization apply to "
                         f"{' and '.join(SCOPED)} only")
    if scope.kind == "sender":
        from gateway.policy.senders import load_registry

        registry = load_registry(config.path(config.senders.dir), config.checks,
                                 config.limits.ceiling)
        if scope.value not in registry.by_id:
            raise SystemExit(f"error: no registered sender {scope.value!r}")
    return scope


def _describe(name: str) -> str:
    kind, scope = parse_set_name(name)
    return kind if scope.kind == "global" else f"{kind} ({scope.describe()})"


def cmd_import(args) -> int:
    config = load_config(args.config)
    scope = _scope(args, config)
    name = set_name(args.flag, scope)
    try:
        with open(args.file, encoding="utf-8-sig", newline="") as fh:
            rows = read_addresses(fh, args.column, args.delimiter,
                                  config.flags.subaddress_separator)
    except OSError as exc:
        print(f"error: {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except CSVFormatError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    for line, reason in rows.bad[:SHOWN_BAD]:
        print(f"{args.file}:{line}: {reason}", file=sys.stderr)
    if len(rows.bad) > SHOWN_BAD:
        print(f"{args.file}: ... and {len(rows.bad) - SHOWN_BAD} more bad rows", file=sys.stderr)
    if rows.bad and not args.skip_bad:
        # the whole file is checked before anything changes: nothing half-imported
        print(f"not imported: {len(rows.bad)} bad row(s); fix them, or --skip-bad to import "
              "the others", file=sys.stderr)
        return 1
    if args.replace and not rows.addresses and not args.allow_empty:
        print(f"not imported: {args.file} has no address, and --replace would empty "
              f"{_describe(name)} (--allow-empty to mean it)", file=sys.stderr)
        return 1

    async def work(flags: FlagStore) -> int:
        members = list(dict.fromkeys(flags.member(a) for a in rows.addresses))
        if args.replace:
            current = (await flags.counts()).get(name, 0)
            if len(members) < current * (1 - args.max_shrink / 100) and not args.force:
                print(f"not imported: {_describe(name)} would shrink from {current} to "
                      f"{len(members)} members, more than --max-shrink {args.max_shrink:g}% "
                      "(a truncated export?); --force to mean it", file=sys.stderr)
                return 1
            size = await flags.replace(name, members)
            print(f"{_describe(name)}: replaced; {size} member(s) (was {current})")
            audited = audit_cli(config, "flags_replace", set=name, file=str(args.file),
                                rows=len(rows.addresses), bad_rows=len(rows.bad), size=size,
                                was=current)
        else:
            added = await flags.add(name, members)
            print(f"{_describe(name)}: {added} added, {len(members) - added} already present")
            audited = audit_cli(config, "flags_import", set=name, file=str(args.file),
                                rows=len(rows.addresses), bad_rows=len(rows.bad), added=added)
        if rows.header:
            print(f"line {rows.header[0]} read as the header row ({rows.header[1]})")
        if rows.bad:
            print(f"{len(rows.bad)} bad row(s) left out (listed above, --skip-bad)")
        return audited

    from gateway.ops.cli import audit_cli

    return _run(config, work)


def cmd_remove(args) -> int:
    config = load_config(args.config)
    scope = _scope(args, config)
    name = set_name(args.flag, scope)

    async def work(flags: FlagStore) -> int:
        status = 0
        for address in args.address:
            try:
                if args.flag == "unsubscribed":
                    removed = await flags.forget_optout(address, scope)
                else:
                    removed = await flags.remove(name, [flags.member(address)]) > 0
            except AddressError as exc:
                print(f"error: {address!r}: {exc}", file=sys.stderr)
                status = 2
                continue
            print(f"{address}: {'removed from' if removed else 'was not in'} {_describe(name)}")
        return status

    return _run(config, work)


def cmd_check(args) -> int:
    config = load_config(args.config)
    settings = config.check_settings("recipient_flags")

    async def work(flags: FlagStore) -> int:
        try:
            names = await flags.flags_of(args.address)
        except AddressError as exc:
            print(f"error: {args.address!r}: {exc}", file=sys.stderr)
            return 2
        if not names:
            print(f"{args.address}: no flags")
            return 0
        print(f"{args.address}:")
        for name in names:
            rule = rule_of(name)
            print(f"  {_describe(name):<48} rule {flags.keys.rule_id(rule)}; receives "
                  f"{', '.join(getattr(settings, rule)) or 'nothing'}")
        return 0

    return _run(config, work)


def cmd_list(args) -> int:
    config = load_config(args.config)
    settings = config.check_settings("recipient_flags")

    async def work(flags: FlagStore) -> int:
        print("rules (log lines name them by id only):")
        for rule in RULES:
            print(f"  {flags.keys.rule_id(rule)}  {rule:<15} receives "
                  f"{', '.join(getattr(settings, rule)) or 'nothing'}")
        counts = await flags.counts()
        print("sets:" if counts else "sets: none")
        for name, n in counts.items():
            print(f"  {_describe(name):<56} {n:>9}")
        return 0

    return _run(config, work)


def cmd_export_optouts(args) -> int:
    config = load_config(args.config)

    async def work(flags: FlagStore) -> int:
        records = await flags.optout_records()
        if args.output in (None, "-"):
            write_optouts(sys.stdout, records)
        else:
            tmp = Path(args.output).with_name(Path(args.output).name + ".tmp")
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                write_optouts(fh, records)
            tmp.replace(args.output)
            print(f"{len(records)} opt-out(s) written to {args.output}", file=sys.stderr)
        return 0

    return _run(config, work)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """``gateway flags ...`` under the main parser's subcommands."""
    flags = sub.add_parser("flags", parents=[common], help="recipient flags (FERPA, Do Not "
                           "Email / Contact, opt-outs), straight in the state store"
                           ).add_subparsers(dest="flags_command", required=True)

    def scoped(p):
        p.add_argument("--sender", help="an opt-out for this sender id only")
        p.add_argument("--organization", help="an opt-out for this organization only")

    imp = flags.add_parser("import", parents=[common], help="load addresses from a CSV file")
    imp.add_argument("--flag", required=True, choices=RULES, help="the set to load into")
    imp.add_argument("file", help="CSV file: one address a row (a first row without an "
                     "address is a header row), or see --column")
    imp.add_argument("--column", help="read this column of a CSV with a header row (default: "
                     "the only column, or one named email, e-mail, mail or address)")
    imp.add_argument("--delimiter", default=",", help="field separator (default: ,)")
    imp.add_argument("--replace", action="store_true", help="the file is the whole set: swap "
                     "it in atomically (default: add to the set)")
    imp.add_argument("--skip-bad", action="store_true", help="import the good rows even if "
                     "some are bad (default: a bad row imports nothing)")
    imp.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the default now
    imp.add_argument("--allow-empty", action="store_true",
                     help="with --replace, accept a file without addresses (empties the set)")
    imp.add_argument("--max-shrink", type=float, default=50.0, metavar="PERCENT",
                     help="with --replace, refuse to shrink the set by more than this "
                     "(default: %(default)s)")
    imp.add_argument("--force", action="store_true", help="with --replace, ignore --max-shrink")
    scoped(imp)
    imp.set_defaults(func=cmd_import)

    rem = flags.add_parser("remove", parents=[common], help="take addresses out of a set")
    rem.add_argument("--flag", required=True, choices=KINDS,
                     help="the set; unsubscribed: an opt-out the gateway recorded (also its "
                     "export row)")
    rem.add_argument("address", nargs="+", help="an address to remove; several allowed")
    scoped(rem)
    rem.set_defaults(func=cmd_remove)

    chk = flags.add_parser("check", parents=[common], help="which flags an address carries")
    chk.add_argument("address", help="the address to look up")
    chk.set_defaults(func=cmd_check)

    flags.add_parser("list", parents=[common], help="the sets, their sizes, and the rule ids "
                     "the log uses").set_defaults(func=cmd_list)

    exp = flags.add_parser("export-optouts", parents=[common], help="the opt-outs the gateway "
                           "recorded, as CSV for the system of record")
    exp.add_argument("--output", "-o", help="file to write (default: standard output)")
    exp.set_defaults(func=cmd_export_optouts)
