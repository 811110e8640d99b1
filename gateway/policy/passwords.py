"""SMTP AUTH password hashes: scrypt (stdlib) in the passlib/PHC-like form
``$scrypt$ln=15,r=8,p=1$<salt>$<hash>``, or argon2 (``$argon2id$...``) when argon2-cffi is installed.

Verification costs tens of milliseconds of CPU by design; callers run it off the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 15, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * n * r + 2**20)


def hash_password(password: str, ln: int = SCRYPT_LN) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password.encode(), salt, ln, SCRYPT_R, SCRYPT_P)
    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_hash_format(encoded: str) -> str | None:
    """Return None when ``encoded`` is a usable hash, else the reason it is not."""
    if encoded.startswith("$argon2"):
        try:
            import argon2  # noqa: F401  (only whether it is installed)
        except ImportError:
            return "argon2 hashes need the argon2-cffi package installed"
        return None
    try:
        _parse_scrypt(encoded)
    except ValueError as exc:
        return str(exc)
    return None


def _parse_scrypt(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        raise ValueError("expected '$scrypt$ln=N,r=R,p=P$salt$hash' or an argon2 hash")
    try:
        params = dict(kv.split("=", 1) for kv in parts[2].split(","))
        ln, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        salt, digest = _unb64(parts[3]), _unb64(parts[4])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed scrypt hash ({exc})") from None
    if not (1 <= ln <= 20 and r >= 1 and p >= 1 and salt and len(digest) >= 16):
        raise ValueError("scrypt hash parameters out of range")
    return ln, r, p, salt, digest


def verify_password(password: str | bytes, encoded: str) -> bool:
    pw = password.encode() if isinstance(password, str) else password
    if encoded.startswith("$argon2"):
        import argon2

        try:
            return argon2.PasswordHasher().verify(encoded, pw)
        except argon2.exceptions.VerificationError:
            return False
    ln, r, p, salt, digest = _parse_scrypt(encoded)
    return hmac.compare_digest(_scrypt(pw, salt, ln, r, p), digest)


def generate_password() -> str:
    return secrets.token_urlsafe(24)
