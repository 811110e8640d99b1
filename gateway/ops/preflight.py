"""What ``serve`` needs from the file system and the state store, checked before it starts.

``gateway check-config`` (the systemd unit's ExecStartPre) and ``gateway serve`` both run these
checks, so a configuration that passes ``check-config`` does not then fail to start for a path,
permission or key reason: the TLS certificate and key (readable, parseable, matching), the secret
key files (readable, or creatable where missing), the directories the gateway writes (quarantine,
Maildir upstream, SQLite state, log file), CA bundles, and the flags key against the one the state
store's flags were built with. Each problem is a :class:`ConfigError` naming the file, the key and
the path, with the operating system's reason.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

from gateway.infra.config import Config
from gateway.infra.typed import ConfigError


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _creatable(path: Path) -> str | None:
    """Why ``path`` (which does not exist) could not be created with its missing parents."""
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"does not exist and cannot be created: {base} is not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"does not exist and cannot be created: {base} is not writable by this user"
    return None


def readable_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None."""
    if path.is_dir():
        return "is a directory, not a file"
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read: {_strerror(exc)}"


def secret_file(path: Path) -> str | None:
    """A key file the gateway reads, or creates on first start (gateway.ops.maillog._secret_file)."""
    if path.exists() or path.is_symlink():
        return readable_file(path)
    return _creatable(path)


def writable_dir(path: Path, subdirs: tuple[str, ...] = ()) -> str | None:
    """A directory the gateway creates (with ``subdirs``) and writes files into."""
    if not path.exists():
        return _creatable(path)
    if not path.is_dir():
        return "exists and is not a directory"
    for d in (path, *(path / s for s in subdirs)):
        if d.exists():
            if not d.is_dir():
                return f"{d} exists and is not a directory"
            if not os.access(d, os.W_OK | os.X_OK):
                return f"{d} is not writable by this user"
        elif not os.access(path, os.W_OK | os.X_OK):
            return f"{d} does not exist and {path} is not writable by this user"
    return None


def writable_file(path: Path) -> str | None:
    """A file the gateway opens for writing (creating it, and its directory, if missing)."""
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return None if os.access(path, os.W_OK) else "is not writable by this user"
    return _creatable(path)


def tls_pair(cert: Path, key: Path) -> tuple[str, str] | None:
    """(key name, reason) if the certificate and key cannot be loaded as a pair."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        reason = readable_file(path)
        if reason:
            return name, reason
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(cert))
    except (ssl.SSLError, ValueError) as exc:
        return "tls_cert", f"not a PEM certificate ({exc})"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return "tls_key", f"does not match the certificate {cert}"
        return "tls_key", f"not a usable PEM private key ({exc.reason or exc})"
    return None


def ca_bundle(path: Path) -> str | None:
    reason = readable_file(path)
    if reason:
        return reason
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        return f"not a PEM CA bundle ({exc})"
    return None


def file_problems(config: Config) -> list[ConfigError]:
    """Every path, permission and TLS problem that would stop ``serve``, in key order."""
    out: list[ConfigError] = []

    def problem(key: str, path: Path, reason: str | None) -> None:
        if reason:
            out.append(ConfigError(config.file, key, f"{path}: {reason}"))

    server = config.server
    if server.tls_cert is not None and server.tls_key is not None:
        cert, key = config.path(server.tls_cert), config.path(server.tls_key)
        bad = tls_pair(cert, key)
        if bad:
            problem(f"server.{bad[0]}", cert if bad[0] == "tls_cert" else key, bad[1])
    up = config.upstream
    if up.url.startswith("maildir:") and server.listen:  # milter-only opens no upstream
        path = config.path(up.url[len("maildir:"):])
        problem("upstream.url", path, writable_dir(path, ("tmp", "new", "cur")))
    if up.ca_file is not None:
        path = config.path(up.ca_file)
        problem("upstream.ca_file", path, ca_bundle(path))
    if config.state.url.startswith("sqlite:"):
        path = config.path(config.state.url[len("sqlite:"):])
        reason = writable_file(path)
        if reason is None and path.parent.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
            reason = f"its directory {path.parent} is not writable (SQLite writes its journal there)"
        problem("state.url", path, reason)
    for key, path in (("admin.token_file", config.admin.token_file),
                      ("logging.hash_key_file", config.logging.hash_key_file),
                      ("flags.key_file", config.flags.key_file)):
        path = config.path(path)
        problem(key, path, secret_file(path))
    if config.logging.file is not None:
        path = config.path(config.logging.file)
        problem("logging.file", path, writable_file(path))
    path = config.path(config.logging.audit_file)
    problem("logging.audit_file", path, writable_file(path))
    if config.admin.token_dir is not None:
        path = config.path(config.admin.token_dir)
        reason = None if path.is_dir() else "is not a directory"
        for token in sorted(path.glob("*.token")) if reason is None else ():
            reason = reason or readable_file(token)
            if reason:
                reason = f"{token.name}: {reason}"
                break
        problem("admin.token_dir", path, reason)
    for i, item in enumerate(getattr(getattr(config, "milter", None), "listen", ())):
        if item.startswith("unix:"):  # the socket is created (replacing a stale one) at start
            path = Path(item[len("unix:"):])
            problem(f"milter.listen[{i}]", path, writable_dir(path.parent))
    arc = getattr(config, "arc", None)
    if arc is not None and arc.domain:  # sealing on: the key is read at start
        from gateway.message.arc import ArcKeyError, load_key

        try:
            load_key(config.path(arc.key_file))
        except ArcKeyError as exc:
            out.append(ConfigError(config.file, "arc.key_file", str(exc)))
    path = config.path(config.quarantine.dir)
    problem("quarantine.dir", path, writable_dir(path, ("tmp", "new", "cur", "meta")))
    if config.flags.forward_ca_file is not None:
        path = config.path(config.flags.forward_ca_file)
        problem("flags.forward_ca_file", path, ca_bundle(path))
    return out


async def store_problems(config: Config, timeout: float = 5.0) -> list[ConfigError]:
    """The flags key file against the key the state store's flags were built with (``serve``
    refuses to start with another one). Skipped when the store holds nothing yet (a SQLite
    file not created) or keeps nothing (``memory:``)."""
    from gateway.infra.clock import SystemClock
    from gateway.policy.flags import FlagKeyMismatch, FlagKeys, FlagStore, _KEY_ID
    from gateway.ops.maillog import load_hash_key
    from gateway.state import open_store

    url = config.state.url
    if url == "memory:":
        return []
    if url.startswith("sqlite:") and not config.path(url[len("sqlite:"):]).exists():
        return []
    key_path = config.path(config.flags.key_file)
    store = open_store(url, SystemClock(), config.base_dir)
    try:
        try:
            if not key_path.exists():
                stored = await asyncio.wait_for(store.get(_KEY_ID), timeout)
                if stored is not None:
                    return [ConfigError(config.file, "flags.key_file",
                                        f"{key_path}: does not exist, and the flags in the state "
                                        "store were built with a key (restore the key file)")]
                return []
            keys = FlagKeys(load_hash_key(key_path), config.flags.subaddress_separator)
            await asyncio.wait_for(FlagStore(store, keys).check_key(), timeout)
        except FlagKeyMismatch as exc:
            return [ConfigError(config.file, "flags.key_file", f"{key_path}: {exc}")]
        except Exception as exc:  # noqa: BLE001 - whatever it is, serve would stop on it
            return [ConfigError(config.file, "state.url",
                                f"{url}: cannot read the state store: {exc or type(exc).__name__}")]
        return []
    finally:
        await store.close()


class PreflightError(Exception):
    """``serve`` cannot start: one :class:`ConfigError` per problem."""

    def __init__(self, problems: list[ConfigError]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


async def check(config: Config) -> None:
    """Raise :class:`PreflightError` with the file problems or, when the files are fine, the
    state store's flags key problem."""
    problems = file_problems(config) or await store_problems(config)
    if problems:
        raise PreflightError(problems)
