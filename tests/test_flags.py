"""The flags store (gateway.policy.flags, the flag_* methods of every state backend): keyed hashes only,
one round trip per look-up, atomic replace under concurrent look-ups, sealed opt-out records;
the CSV reader; the settings."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import shutil
import sqlite3
import textwrap

import pytest

from gateway.infra.clock import FakeClock
from gateway.infra.config import load_config
from gateway.policy.flags import (FERPA, OPT_OUT, UNSUBSCRIBED, FlagKeyMismatch, FlagKeys, FlagStore,
                           Scope, normalize, rule_of, set_name, sets_for)
from gateway.policy.flags_csv import CSVFormatError, read_addresses
from gateway.message.address import AddressError
from gateway.state import open_store
from gateway.infra.typed import ConfigError
from tests.conftest import free_port
from tests.redis_server import RedisServer

KEY = b"k" * 32
ADDRESSES = [f"student{i}@example.edu" for i in range(1000)]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "memory":
        return "memory:"
    if request.param == "sqlite":
        return "sqlite:state.sqlite3"
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


def flag_store(url, base, key=KEY) -> FlagStore:
    return FlagStore(open_store(url, FakeClock(), base), FlagKeys(key))


# --- addresses and keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("given,normal", [
    ("alice@example.edu", "alice@example.edu"),
    ("  <Alice@Example.EDU> ", "alice@example.edu"),
    ("alice+news@example.edu", "alice@example.edu"),
    ("+x@example.edu", "+x@example.edu"),  # nothing before the separator: kept whole
    ('"a+b"@example.edu', '"a+b"@example.edu'),
])
def test_normalize(given, normal):
    assert normalize(given) == normal


@pytest.mark.parametrize("bad", ["", "alice", "@example.edu", "a@b@c", "alice@[192.0.2.1]",
                                 "alice@example", "a b@example.edu"])
def test_normalize_refuses_what_is_not_an_address(bad):
    with pytest.raises(AddressError):
        normalize(bad)


def test_members_are_keyed_hashes():
    import hashlib
    import hmac

    keys = FlagKeys(KEY)
    member = keys.member("Alice@example.edu")
    assert member == hmac.new(KEY, b"alice@example.edu", hashlib.sha256).hexdigest()[:32]
    long_key = b"L" * 100  # longer than the block: hashed first (RFC 2104)
    assert FlagKeys(long_key).member("a@example.edu") == hmac.new(
        long_key, b"a@example.edu", hashlib.sha256).hexdigest()[:32]
    assert member == keys.member("alice+x@EXAMPLE.edu") and len(member) == 32
    assert FlagKeys(b"o" * 32).member("alice@example.edu") != member  # another key, no match
    assert FlagKeys(KEY, subaddress_separator="").member("alice+x@example.edu") != member
    assert keys.rule_id("ferpa") != keys.rule_id("opt_out")
    assert "ferpa" not in keys.rule_id("ferpa")
    with pytest.raises(ValueError):
        FlagKeys(b"short")


def test_set_names_and_rules():
    assert set_name(OPT_OUT, Scope("sender", "acme")) == "opt_out/sender:acme"
    org = Scope.of(organization=" Acme  Marketing ")
    assert set_name(UNSUBSCRIBED, org) == "unsubscribed/org:acme marketing"
    assert rule_of("unsubscribed/org:acme marketing") == OPT_OUT
    with pytest.raises(ValueError):
        set_name(FERPA, Scope("sender", "acme"))
    with pytest.raises(ValueError):
        Scope.of(sender="a", organization="b")
    assert sets_for(None) == ["ferpa", "do_not_email", "do_not_contact", "opt_out",
                              "unsubscribed"]


# --- the backends ---------------------------------------------------------------------------------

async def test_add_lookup_remove_replace(store_url, tmp_path):
    flags = flag_store(store_url, tmp_path)
    m = [flags.member(a) for a in ADDRESSES[:3]]
    assert await flags.add(FERPA, [m[0], m[1]]) == 2
    assert await flags.add(FERPA, [m[1]]) == 0
    await flags.add("opt_out/sender:acme", [m[1]])
    names = ["ferpa", "opt_out/sender:acme", "do_not_email"]
    found = await flags.lookup(ADDRESSES[:3] + ["not an address"], names)
    assert found == {ADDRESSES[0]: {"ferpa"}, ADDRESSES[1]: {"ferpa", "opt_out/sender:acme"}}
    assert await flags.remove(FERPA, [m[0], m[2]]) == 1
    assert await flags.replace(FERPA, iter([m[2]])) == 1
    assert await flags.lookup(ADDRESSES[:3], names) == {
        ADDRESSES[1]: {"opt_out/sender:acme"}, ADDRESSES[2]: {"ferpa"}}
    assert await flags.counts() == {"ferpa": 1, "opt_out/sender:acme": 1}
    assert await flags.flags_of(ADDRESSES[1]) == ["opt_out/sender:acme"]
    assert await flags.replace(FERPA, []) == 0
    assert await flags.counts() == {"opt_out/sender:acme": 1}
    await flags.store.close()


async def test_lookup_is_one_round_trip_for_many_recipients(store_url, tmp_path):
    flags = flag_store(store_url, tmp_path)
    await flags.replace(FERPA, [flags.member(a) for a in ADDRESSES[::2]])
    calls = []
    original = flags.store.flag_lookup

    async def counting(names, members):
        calls.append(len(members))
        return await original(names, members)

    flags.store.flag_lookup = counting
    found = await flags.lookup(ADDRESSES[:600], sets_for(None))
    assert calls == [600]
    assert set(found) == set(ADDRESSES[:600:2])
    await flags.store.close()


async def test_replace_is_atomic_under_concurrent_lookups(store_url, tmp_path):
    """Readers on their own connection never see a partial or empty set while a big set is
    swapped: the flagged recipient is found by every look-up, before, during and after."""
    if store_url == "memory:":
        pytest.skip("one process, and the swap is one assignment that never yields")
    writer = flag_store(store_url, tmp_path)
    reader = flag_store(store_url, tmp_path)
    always = "alice@example.edu"
    first = [writer.member(always)] + [writer.member(f"a{i}@example.edu") for i in range(60000)]
    second = [writer.member(always)] + [writer.member(f"b{i}@example.edu") for i in range(60000)]
    await writer.replace(FERPA, first)
    done = asyncio.Event()
    seen = []

    async def read():
        while not done.is_set():
            found = await reader.lookup([always, "a1@example.edu", "b1@example.edu"], [FERPA])
            seen.append(found)
            await asyncio.sleep(0)

    task = asyncio.create_task(read())
    for members in (second, first, second):
        assert await writer.replace(FERPA, members) == 60001
    done.set()
    await task
    assert len(seen) > 3
    assert all(always in found for found in seen)
    # each answer is the old set or the new one, never a mix or neither
    assert all(("a1@example.edu" in found) != ("b1@example.edu" in found) for found in seen)
    assert await reader.counts() == {"ferpa": 60001}
    await writer.store.close()
    await reader.store.close()


async def test_sqlite_file_holds_no_clear_address(tmp_path):
    flags = flag_store("sqlite:state.sqlite3", tmp_path)
    await flags.replace(FERPA, [flags.member(a) for a in ADDRESSES])
    await flags.record_optout("zelda.unique@example.edu", Scope("sender", "acme"),
                              sender="acme", organization="Acme",
                              at=dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc))
    await flags.store.close()
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = db.execute("SELECT member FROM flag_members").fetchall()
    assert len(rows) == 1001 and all(len(r[0]) == 32 for r in rows)
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("state"))
    assert b"example.edu" not in raw and b"student" not in raw and b"zelda" not in raw


async def test_redis_holds_no_clear_address(redis_url, tmp_path):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    flags = flag_store(redis_url, tmp_path)
    await flags.replace(FERPA, [flags.member(a) for a in ADDRESSES])
    await flags.add("opt_out/sender:acme", [flags.member(ADDRESSES[0])])
    await flags.record_optout("zelda.unique@example.edu", Scope("sender", "acme"),
                              sender="acme", organization="Acme",
                              at=dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc))
    dump = []
    async for key in client.scan_iter():
        dump.append(key)
        kind = (await client.type(key)).decode()
        if kind == "set":
            dump += list(await client.smembers(key))
        elif kind == "string":
            dump.append(await client.get(key))
    assert len(dump) > 1000
    assert not any(b"example.edu" in item or b"zelda" in item or b"student" in item
                   for item in dump)
    assert not [k async for k in client.scan_iter("flagbuild:*")]  # nothing left behind
    await client.aclose()
    await flags.store.close()


async def test_abandoned_build_leaves_the_live_set_alone(store_url, tmp_path):
    flags = flag_store(store_url, tmp_path)
    await flags.replace(FERPA, [flags.member("alice@example.edu")])

    def members():
        yield flags.member("bob@example.edu")
        raise RuntimeError("export broke")

    with pytest.raises(RuntimeError):
        await flags.replace(FERPA, members())
    assert await flags.flags_of("alice@example.edu") == ["ferpa"]
    assert await flags.flags_of("bob@example.edu") == []
    await flags.store.close()


async def test_key_mismatch_is_refused(store_url, tmp_path):
    flags = flag_store(store_url, tmp_path)
    await flags.check_key()  # nothing claimed yet: fine
    await flags.add(FERPA, [flags.member("alice@example.edu")])
    other = FlagStore(flags.store, FlagKeys(b"o" * 32))
    with pytest.raises(FlagKeyMismatch):
        await other.check_key()
    with pytest.raises(FlagKeyMismatch):
        await other.add(FERPA, [other.member("bob@example.edu")])
    await flags.check_key()
    await flags.store.close()


async def test_optout_records_are_sealed_and_exported(store_url, tmp_path):
    flags = flag_store(store_url, tmp_path)
    at = dt.datetime(2026, 11, 2, 15, 0, tzinfo=dt.timezone.utc)
    scope = Scope("sender", "acme")
    assert await flags.record_optout("Alice+promo@Example.edu", scope, sender="acme",
                                     organization="Acme", at=at)
    assert not await flags.record_optout("alice+promo@example.edu", scope, sender="acme",
                                         organization="Acme", at=at + dt.timedelta(hours=1))
    await flags.record_optout("bob@example.edu", Scope(), sender="acme", organization="Acme",
                              at=at + dt.timedelta(minutes=5))
    records = await flags.optout_records()
    assert [(r.address, r.scope, r.recorded_at) for r in records] == [
        ("alice+promo@example.edu", scope, "2026-11-02T15:00:00+00:00"),
        ("bob@example.edu", Scope(), "2026-11-02T15:05:00+00:00")]
    assert await flags.flags_of("alice@example.edu") == ["unsubscribed/sender:acme"]
    raw = b"".join((await flags.store.scan("optout:")).values())
    assert b"alice" not in raw and b"acme" not in raw
    with pytest.raises(FlagKeyMismatch):
        await FlagStore(flags.store, FlagKeys(b"o" * 32)).optout_records()
    assert await flags.forget_optout("alice@example.edu", scope)
    assert [r.address for r in await flags.optout_records()] == ["bob@example.edu"]
    await flags.store.close()


# --- CSV ------------------------------------------------------------------------------------------

def read(text: str, **kwargs):
    return read_addresses(io.StringIO(text, newline=""), **kwargs)


def test_csv_one_address_a_row_with_bad_rows_by_line():
    rows = read("alice@example.edu\r\n\r\n<bob@example.edu>\r\nnot-an-address\r\n"
                "\"carol@example.edu\"\r\na@x.edu,b@x.edu\r\n\"multi\nline\"\r\n"
                "dave@example.edu,\r\n")
    assert rows.addresses == ["alice@example.edu", "<bob@example.edu>", "carol@example.edu",
                              "dave@example.edu"]
    assert rows.bad == [
        (4, "'not-an-address' is not an address: address must be local-part@domain"),
        (6, "2 values; expected one address a row (--column NAME reads one column of a wider "
            "file)"),
        (7, "'multi\\nline' is not an address: address must be local-part@domain")]


def test_csv_named_column_and_delimiter():
    text = "id; Email ;name\n1;alice@example.edu;Alice\n2;;Nobody\n3;bob@example.edu\n4\n"
    rows = read(text, column="email", delimiter=";")
    assert rows.addresses == ["alice@example.edu", "bob@example.edu"]
    assert rows.bad == [(3, "no value in column 'email'"), (5, "no value in column 'email'")]
    with pytest.raises(CSVFormatError, match=r"line 1: no column 'mail' in the header "
                                             r"\(id, email, name\)"):
        read(text, column="mail", delimiter=";")
    with pytest.raises(CSVFormatError, match="no header row"):
        read("\n\n", column="email")


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xef\xbb\xbfemail\r\nalice@example.edu\r\n")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        assert read_addresses(fh, "email").addresses == ["alice@example.edu"]


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,key,reason", [
    ('[checks.recipient_flags]\nferpa = ["educational", "promotional"]\n',
     "checks.recipient_flags.ferpa", "promotional cannot be allowed"),
    ('[checks.recipient_flags]\nopt_out = ["newsletter"]\n', "checks.recipient_flags.opt_out[0]",
     "'newsletter' is not one of"),
    ('[checks.recipient_flags]\non_flagged = "bounce"\n', "checks.recipient_flags.on_flagged",
     "'bounce' is not one of 'drop' | 'reject'"),
    ('[flags]\nunsubscribe_base_url = "http://unsub.example.edu"\n',
     "flags.unsubscribe_base_url", "expected https://host[/path]"),
    ('[flags]\nsubaddress_separator = "ab"\n', "flags.subaddress_separator", "one punctuation"),
    ('[flags]\nunsubscribe_scope = "everyone"\n', "flags.unsubscribe_scope", "is not one of"),
    ('[flags]\nunsubscribe_days = 0\n', "flags.unsubscribe_days", "at least 1"),
])
def test_bad_settings_name_the_key(tmp_path, text, key, reason):
    path = tmp_path / "gateway.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and reason in info.value.reason


def test_shipped_configuration_documents_every_key_with_its_default():
    from pathlib import Path

    from gateway.checks import CHECK_SETTINGS
    from gateway.infra.config import FlagsConfig

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "gateway.toml")
    assert config.flags == FlagsConfig()
    assert config.checks["recipient_flags"] == CHECK_SETTINGS["recipient_flags"]()
    text = (root / "gateway.toml").read_text()
    for table, fields in (("[flags]", FlagsConfig.__dataclass_fields__),
                          ("[checks.recipient_flags]",
                           CHECK_SETTINGS["recipient_flags"].__dataclass_fields__)):
        body = text.split(table + "\n", 1)[1].split("\n[", 1)[0]
        keys = {ln.lstrip("# ").split("=", 1)[0].strip() for ln in body.splitlines()
                if "=" in ln and not ln.startswith("#   ") and
                ln.lstrip("# ").split("=", 1)[0].strip().isidentifier()}
        assert set(fields) <= keys, table
