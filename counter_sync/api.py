"""The HTTP API for backends: read, add to, set, list and forget counters, with an API key.

A backend that wants a count, or to add the votes that came in by e-mail,
calls these on the server's own port (with ``--api-key-file``; without it
there is no API, and every path under ``/api/`` is 404):

========  ==============================  ==========================================
method    path                            what
========  ==============================  ==========================================
GET       ``/api/counters/<room>``        ``{"room", "value", "users", "seq"}``
POST      ``/api/counters/<room>``        ``{"add": N}`` or ``{"set": V}``: applied
                                          like a click, shown to the room's users on
                                          every instance; answers the new state
DELETE    ``/api/counters/<room>``        resets it to 0 and forgets it
GET       ``/api/counters``               ``?prefix=P&limit=N&after=ROOM``: a page of
                                          counters, by name
========  ==============================  ==========================================

``<room>`` is a room's name, or ``%2F`` for the counter at ``/``. Every
request needs ``Authorization: Bearer <key>`` with one of the keys; anything
else is 401, without saying which part was wrong. A POST with an
``Idempotency-Key`` header counts once however often it is sent, within
``--session-ttl``: the key is kept like a session's last done op.
"""

from __future__ import annotations

import hashlib
import hmac
import http
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from websockets.http11 import Request, Response

from counter_sync.config import MAX_API_PAGE, MAX_IDEMPOTENCY_KEY, MAX_VALUE
from counter_sync.connection import BodyError, Connection
from counter_sync.hub import ROOM_NAME, Hub
from counter_sync.store import DEFAULT_ROOM, Change, OpBatch, RoomState, StoreUnavailable

__all__ = ["API_PREFIX", "Api", "KeyFileError", "load_keys"]

API_PREFIX = "/api/"
_COUNTERS = "/api/counters"


class KeyFileError(Exception):
    """The API key file cannot be used; the text is one line for the operator."""


class _Problem(Exception):
    """A request the API answers with an error: its status and a one-line reason."""

    def __init__(self, status: http.HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def load_keys(path: str) -> list[bytes]:
    """The API keys in ``path``: one per line; blank lines and ``#`` comments are skipped.

    Raises :exc:`KeyFileError`, one line for the operator, if there is none to read.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise KeyFileError(f"--api-key-file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.startswith(b"#")]
    if not keys:
        raise KeyFileError(f"--api-key-file {path}: no key in it (one per line)")
    return keys


class Api:
    """Answers the requests under ``/api/`` for one hub, given its keys."""

    def __init__(self, hub: Hub, keys: list[bytes]) -> None:
        self.hub = hub
        self.keys = keys

    async def respond(
        self, websocket: Connection, request: Request, path: str, query: str
    ) -> Response:
        """The response to one API request (its target read already: ``path``, ``query``).

        Errors are JSON with a reason, never a traceback.
        """
        try:
            try:
                body = await websocket.request_body()
            except BodyError as exc:
                raise _Problem(http.HTTPStatus(exc.status), exc.reason) from None
            status, answer = await self._route(request, path, query, body)
        except _Problem as problem:
            status, answer = problem.status, {"error": problem.reason}
        response = websocket.respond(status, json.dumps(answer) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        response.headers["Cache-Control"] = "no-store"
        if status == http.HTTPStatus.METHOD_NOT_ALLOWED:
            response.headers["Allow"] = answer["allow"]
        if status == http.HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="counter-sync"'
        return response

    async def _route(
        self, request: Request, path: str, query: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        if not self._authorized(request.headers.get("Authorization", "")):
            raise _Problem(http.HTTPStatus.UNAUTHORIZED, "unauthorized")
        handlers: dict[str, Callable[[], Any]]
        if path == _COUNTERS:
            handlers = {"GET": lambda: self._list(query)}
        elif path.startswith(_COUNTERS + "/"):
            room = _room_name(path[len(_COUNTERS) + 1 :])
            handlers = {
                "GET": lambda: self._read(room),
                "POST": lambda: self._change(room, request, body),
                "DELETE": lambda: self._forget(room),
            }
        else:
            raise _Problem(http.HTTPStatus.NOT_FOUND, "no such endpoint")
        if request.method not in handlers:
            return self._not_allowed(", ".join(handlers))
        try:
            result: tuple[int, dict[str, Any]] = await handlers[request.method]()
        except StoreUnavailable as exc:
            raise _Problem(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"store unavailable: {exc}"
            ) from None
        return result

    def _authorized(self, header: str) -> bool:
        """Compare the bearer key with every key, in constant time, whichever matches."""
        scheme, _, given = header.partition(" ")
        candidate = given.strip().encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        return scheme.lower() == "bearer" and matched

    @staticmethod
    def _not_allowed(allowed: str) -> tuple[int, dict[str, Any]]:
        return http.HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed", "allow": allowed}

    # The endpoints.

    async def _read(self, room: str) -> tuple[int, dict[str, Any]]:
        state, elsewhere = await self.hub.store.peek(room)
        return http.HTTPStatus.OK, self._describe(room, self._shown(room, state), elsewhere)

    async def _change(
        self, room: str, request: Request, body: bytes | None
    ) -> tuple[int, dict[str, Any]]:
        add, set_to = _parse_change(body)
        ops: tuple[OpBatch, ...] = ()
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
                raise _Problem(
                    http.HTTPStatus.BAD_REQUEST,
                    f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} characters",
                )
            ops = (OpBatch(_idempotency_session(key), 1, (add,)),)
            add = 0
        [outcome] = await self.hub.store.commit([Change(room, add, ops, set_to=set_to)])
        self._show(room, outcome.state)
        if not outcome.applied:
            raise _Problem(http.HTTPStatus.CONFLICT, f"value out of range (±{MAX_VALUE})")
        answer = self._describe(room, outcome.state, await self._elsewhere(room))
        answer["duplicate"] = bool(ops) and outcome.done[ops[0].session][0] >= 1
        return http.HTTPStatus.OK, answer

    async def _forget(self, room: str) -> tuple[int, dict[str, Any]]:
        state = await self.hub.store.forget(room)
        self._show(room, state)
        return http.HTTPStatus.OK, self._describe(room, state, await self._elsewhere(room))

    async def _list(self, query: str) -> tuple[int, dict[str, Any]]:
        params = parse_qs(query, keep_blank_values=True)
        prefix = params.get("prefix", [""])[0]
        after = params.get("after", [""])[0]
        try:
            limit = int(params.get("limit", [str(MAX_API_PAGE)])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_API_PAGE:
            raise _Problem(http.HTTPStatus.BAD_REQUEST, f"limit: 1 to {MAX_API_PAGE}")
        page = await self.hub.store.counters(prefix, after, limit + 1)
        counters = [
            {"room": room, "value": state.value, "seq": state.seq} for room, state in page[:limit]
        ]
        following = page[limit - 1][0] if len(page) > limit else None
        return http.HTTPStatus.OK, {"counters": counters, "next": following}

    # Keeping the rooms open here in step.

    def _shown(self, room: str, state: RoomState) -> RoomState:
        """The newer of what the store says and what the room here shows."""
        open_room = self.hub.rooms.get(room)
        if open_room is not None and not state.is_newer_than(open_room.state):
            return open_room.state
        return state

    def _show(self, room: str, state: RoomState) -> None:
        """A change made here reaches the room's users here (the store tells other instances)."""
        open_room = self.hub.rooms.get(room)
        if open_room is not None:
            open_room.flush.observe(state=state)

    async def _elsewhere(self, room: str) -> int:
        if room in self.hub.rooms:
            return 0  # counted by the room, with its users here
        return (await self.hub.store.peek(room))[1]

    def _describe(self, room: str, state: RoomState, elsewhere: int) -> dict[str, Any]:
        open_room = self.hub.rooms.get(room)
        users = open_room.count_users() if open_room is not None else elsewhere
        return {"room": room, "value": state.value, "users": users, "seq": state.seq}


def _room_name(segment: str) -> str:
    """The room a path segment names (``%2F`` is ``/``), or a 404."""
    name = unquote(segment)
    if name == DEFAULT_ROOM or ROOM_NAME.fullmatch(name):
        return name
    raise _Problem(http.HTTPStatus.NOT_FOUND, "no such counter: 1 to 64 of A-Z a-z 0-9 _ -")


def _parse_change(body: bytes | None) -> tuple[int, int | None]:
    """``(add, set)`` from a POST body: exactly one of ``{"add": N}`` and ``{"set": V}``."""
    try:
        fields = json.loads(body or b"")
    except (ValueError, RecursionError):
        raise _Problem(http.HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
    if not isinstance(fields, dict) or len(fields.keys() & {"add", "set"}) != 1:
        raise _Problem(http.HTTPStatus.BAD_REQUEST, 'send {"add": N} or {"set": V}')
    (name,) = fields.keys() & {"add", "set"}
    number = fields[name]
    if type(number) is not int or abs(number) > MAX_VALUE:
        raise _Problem(
            http.HTTPStatus.BAD_REQUEST, f'"{name}" must be a whole number within ±{MAX_VALUE}'
        )
    return (number, None) if name == "add" else (0, number)


def _idempotency_session(key: str) -> str:
    """The session an Idempotency-Key is kept as: its hash, so any key fits a session id."""
    return "api-" + hashlib.sha256(key.encode()).hexdigest()[:32]
