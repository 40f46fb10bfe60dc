"""Logins, sessions and CSRF for the console.

Users are those of `acks.users` (pipeline/core/identity.py: one file says who may acknowledge what,
for the pipeline and the console alike) that have a `password`: an argon2id hash, never the
password. The session is a signed cookie (Starlette's SessionMiddleware: itsdangerous, HttpOnly,
SameSite=Strict; Secure with `opscentre.secure_cookie`) holding the login and a CSRF token
that every state-changing request must send back (form field `csrf` or header
`X-CSRF-Token`). The signing secret is kept beside the console's database, so a restart keeps
people logged in.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pipeline.core.identity import AckUsers

_hasher = PasswordHasher()           # argon2id, the library's RFC 9106 defaults
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(users: AckUsers, user: str, password: str) -> bool:
    """Whether ``password`` is the user's. An unknown user costs the same hashing, so the
    answer's timing does not tell who exists."""
    stored = users.passwords.get(user)
    try:
        ok = _hasher.verify(stored or _DUMMY, password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and stored is not None


def session_secret(db: Path) -> str:
    """The cookie-signing secret, made once and kept (0600) beside the database."""
    path = db.with_name(db.name + ".secret")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass                            # the first start: make one
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(session: dict, sent: str | None) -> bool:
    expected = session.get("csrf")
    return bool(expected and sent) and hmac.compare_digest(expected, sent)
