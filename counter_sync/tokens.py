"""Who may read and who may change: signed tokens, and what a connection without one may do.

A token is a JWT signed with HS256 by whoever holds the secret (the
operator's backend): the server checks the signature and the claims, and
needs no call to anyone. Its claims:

* ``sub``: the user (required); rate limits and connection caps are per user.
* ``exp``: when it stops being valid (required). A connection open when it
  passes is closed with 1008 "token expired".
* ``rooms``: the counters it opens (required): names, ``"/"`` for the
  default counter, or prefixes ending in ``*`` (``"poll-*"``).
* ``can``: ``"read"`` (the default: users and state only) or ``"write"``.

Without a token, ``--anonymous`` decides: ``write`` (the default without a
secret: anyone may click), ``read`` (the default with one) or ``none``.
"""

from __future__ import annotations

import dataclasses
import http
import math
from pathlib import Path

import jwt

from counter_sync.config import MIN_SECRET_BYTES

__all__ = [
    "ANONYMOUS",
    "Access",
    "Denied",
    "Grant",
    "SecretError",
    "load_secret",
]

# What --anonymous may say, most open first.
ANONYMOUS = ("write", "read", "none")
# The error a read-only connection gets for each plus or minus.
_READ_ONLY = "read-only: this counter needs a token to change"
_CLAIMS = ("sub", "exp", "rooms")


class SecretError(Exception):
    """The secret file cannot be used; the text is one line for the operator."""


class Denied(Exception):
    """A connection may not open this counter: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: http.HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What one connection may do: whose it is, whether it may change, until when."""

    user: str | None  # the token's sub; None without a token
    can_write: bool
    expires: float = math.inf  # Unix time; a connection still open then is closed

    @property
    def read_only(self) -> str | None:
        """Why this connection may not change the counter (the error it gets), or None."""
        if self.can_write:
            return None
        return _READ_ONLY if self.user is None else "read-only: this token does not allow changes"


def load_secret(path: str) -> bytes:
    """Read the HS256 secret from ``path``: at least MIN_SECRET_BYTES bytes, outer blanks aside.

    Raises :exc:`SecretError`, one line for the operator, if it cannot be used.
    """
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"--token-secret-file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"--token-secret-file {path}: the secret is {len(secret)} bytes; HS256 needs at "
            f"least {MIN_SECRET_BYTES} (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(48))')"
        )
    return secret


class Access:
    """The rule for every connection: a token's claims, or what anonymous users may do."""

    def __init__(self, secret: bytes | None, anonymous: str) -> None:
        if anonymous not in ANONYMOUS:
            raise ValueError(f"anonymous must be one of {ANONYMOUS}")
        self.secret = secret
        self.anonymous = anonymous

    def grant(self, token: str | None, room: str) -> Grant:
        """What a connection to ``room`` carrying ``token`` (or none) may do.

        Raises :exc:`Denied`: 401 for a token that is not valid (bad
        signature, missing claim, expired) or a missing one where anonymous
        users may not connect, 403 for a valid token for other rooms.
        """
        if token is None:
            if self.anonymous == "none":
                raise Denied(http.HTTPStatus.UNAUTHORIZED, "this counter needs a token")
            return Grant(None, can_write=self.anonymous == "write")
        if self.secret is None:
            raise Denied(http.HTTPStatus.UNAUTHORIZED, "this server takes no tokens")
        user, rooms, can_write, expires = self.decode(token)
        if not _opens(rooms, room):
            raise Denied(http.HTTPStatus.FORBIDDEN, "the token is not for this counter")
        return Grant(user, can_write, expires)

    def decode(self, token: str) -> tuple[str, list[str], bool, float]:
        """The token's sub, rooms, write permission and expiry, checked: signature and types.

        Raises :exc:`Denied` (401) for a token that is not valid.
        """
        assert self.secret is not None
        try:
            claims: dict[str, object] = jwt.decode(
                token, self.secret, algorithms=["HS256"], options={"require": list(_CLAIMS)}
            )
        except jwt.ExpiredSignatureError:
            raise Denied(http.HTTPStatus.UNAUTHORIZED, "the token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Denied(
                http.HTTPStatus.UNAUTHORIZED, f'the token has no "{exc.claim}" claim'
            ) from None
        except jwt.InvalidTokenError as exc:
            raise Denied(http.HTTPStatus.UNAUTHORIZED, f"the token is not valid: {exc}") from None
        rooms, sub, can = claims["rooms"], claims["sub"], claims.get("can", "read")
        if not isinstance(sub, str) or not sub:
            raise Denied(http.HTTPStatus.UNAUTHORIZED, 'the token\'s "sub" must be a string')
        if not isinstance(rooms, list) or not all(isinstance(each, str) for each in rooms):
            raise Denied(http.HTTPStatus.UNAUTHORIZED, 'the token\'s "rooms" must be a list')
        if can not in ("read", "write"):
            raise Denied(http.HTTPStatus.UNAUTHORIZED, 'the token\'s "can" must be read or write')
        exp = claims["exp"]
        assert isinstance(exp, int | float)  # PyJWT checked it is a number
        return sub, [str(each) for each in rooms], can == "write", float(exp)


def _opens(patterns: list[str], room: str) -> bool:
    """Tell whether a token's ``rooms`` include ``room``: by name, or by a prefix and ``*``."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if room != "/" and room.startswith(pattern[:-1]):
                return True
        elif pattern == room:
            return True
    return False
