"""Tokens and anonymous access as pure rules: what each token or none may do in which room."""

from __future__ import annotations

import http
import time
from pathlib import Path

import jwt
import pytest

from counter_sync.tokens import Access, Denied, Grant, SecretError, load_secret

SECRET = b"s" * 32


def mint(secret: bytes = SECRET, **claims: object) -> str:
    """A token with sensible claims, overridden (or removed, with None) by ``claims``."""
    body: dict[str, object] = {"sub": "ada", "exp": time.time() + 60, "rooms": ["/"]}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, "HS256")


def mint_with(claims: dict[str, object]) -> str:
    """A token with ``claims``: a number for ``exp`` is seconds from now, a secret signs it."""
    fields = dict(claims)
    secret = fields.pop("secret", SECRET)
    assert isinstance(secret, bytes)
    if isinstance(fields.get("exp"), int):
        fields["exp"] = time.time() + int(fields["exp"])  # type: ignore[call-overload]
    return mint(secret, **fields)


def denied(access: Access, token: str | None, room: str = "/") -> Denied:
    with pytest.raises(Denied) as refused:
        access.grant(token, room)
    return refused.value


def test_a_write_token_for_the_room_may_change_it() -> None:
    grant = Access(SECRET, "read").grant(mint(can="write"), "/")
    assert (grant.user, grant.can_write) == ("ada", True)


def test_a_token_reads_only_unless_it_says_write() -> None:
    assert not Access(SECRET, "read").grant(mint(), "/").can_write


@pytest.mark.parametrize(
    ("rooms", "room", "allowed"),
    [
        (["poll-*"], "poll-1", True),
        (["poll-*"], "pollster", False),
        (["poll-*"], "/", False),
        (["*"], "anything", True),
        (["/"], "/", True),
        (["votes"], "votes", True),
        (["votes"], "votes2", False),
    ],
)
def test_rooms_are_names_or_prefixes(rooms: list[str], room: str, allowed: bool) -> None:
    access = Access(SECRET, "read")
    if allowed:
        assert isinstance(access.grant(mint(rooms=rooms), room), Grant)
    else:
        assert denied(access, mint(rooms=rooms), room).status == http.HTTPStatus.FORBIDDEN


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"secret": b"x" * 32}, "not valid"),
        ({"exp": -10}, "expired"),
        ({"sub": None}, '"sub"'),
        ({"exp": None}, '"exp"'),
        ({"rooms": None}, '"rooms"'),
        ({"rooms": "/"}, '"rooms" must be a list'),
        ({"can": "admin"}, '"can"'),
    ],
    ids=["signature", "expired", "no sub", "no exp", "no rooms", "rooms not a list", "bad can"],
)
def test_a_token_that_is_not_valid_gets_401_with_the_reason(
    claims: dict[str, object], reason: str
) -> None:
    # Minted here, not at collection: a token made then may expire before its test runs.
    refused = denied(Access(SECRET, "read"), mint_with(claims))
    assert refused.status == http.HTTPStatus.UNAUTHORIZED and reason in refused.reason


def test_a_token_signed_with_another_algorithm_is_not_valid() -> None:
    # Only HS256 is taken, whatever the token's header says (no "alg" games).
    claims = {"sub": "a", "exp": time.time() + 60, "rooms": ["/"]}
    token = jwt.encode(claims, b"k" * 64, "HS512")
    assert denied(Access(b"k" * 64, "read"), token).status == http.HTTPStatus.UNAUTHORIZED


@pytest.mark.parametrize(("anonymous", "can_write"), [("write", True), ("read", False)])
def test_anonymous_users_may_do_what_the_flag_says(anonymous: str, can_write: bool) -> None:
    assert Access(None, anonymous).grant(None, "/") == Grant(None, can_write)


def test_anonymous_none_is_401() -> None:
    assert denied(Access(SECRET, "none"), None).status == http.HTTPStatus.UNAUTHORIZED


def test_a_secret_shorter_than_32_bytes_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"short\n")
    with pytest.raises(SecretError, match="5 bytes; HS256 needs at least 32"):
        load_secret(str(path))
    path.write_bytes(b"k" * 32 + b"\n")  # a trailing newline is not part of it
    assert load_secret(str(path)) == b"k" * 32


def test_something_that_is_no_token_at_all_gets_401() -> None:
    refused = denied(Access(SECRET, "read"), "not a token")
    assert refused.status == http.HTTPStatus.UNAUTHORIZED and "not valid" in refused.reason
