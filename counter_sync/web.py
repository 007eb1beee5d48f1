"""The HTTP side of the port: the page, health, the admission probe, and the gate for upgrades.

The library calls :func:`process_request` for every request before its
handshake. A plain GET gets an answer here; a WebSocket upgrade gets through
only if the hub lets it in (:meth:`Hub.refuse <counter_sync.hub.Hub.refuse>`).

Browsers do not show a page why its WebSocket handshake failed: the status
code is hidden from scripts. So ``/admission`` answers the same question in
JSON, for the page to show the reason in words.
"""

from __future__ import annotations

import html
import http
import json
import logging
import re
from collections.abc import Awaitable
from importlib import resources
from urllib.parse import parse_qsl

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import InvalidHeader
from websockets.http11 import Request, Response

from counter_sync.admission import (
    MalformedRequest,
    Refusal,
    address_key,
    split_origin,
)
from counter_sync.api import API_PREFIX, Api
from counter_sync.config import SESSION_ID
from counter_sync.connection import Connection
from counter_sync.hub import Hub, room_from_path
from counter_sync.logs import ThrottleByKey, fields
from counter_sync.store import DEFAULT_ROOM
from counter_sync.tokens import Grant

__all__ = ["PAGE", "Web"]

log = logging.getLogger("counter_sync.web")

_SESSION = re.compile(SESSION_ID)
# Headers admission reads one value of: two would make it guess which counts.
_SINGLE_HEADERS = ("Host", "Origin", "X-Forwarded-For")

# client.html at the top of the repository is the one source: the package
# holds a symbolic link to it, which a wheel turns into a copy.
PAGE = resources.files("counter_sync") / "client.html"

# The paths of plain endpoints, and their names in the HTTP requests metric.
_ENDPOINTS = {
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/admission": "admission",
    "/favicon.ico": "favicon",
}
# What makes a request malformed: the request cannot be read one way.
_MALFORMED = (MalformedRequest, MultipleValuesError, InvalidHeader)

# The 404 page of a /c/ path that names no counter ({path} is escaped in).
_NOT_A_COUNTER = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>No such counter · counter-sync</title>
<style>
  body { max-width: 36rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5;
         font-family: system-ui, sans-serif; color: #1d2330; }
  a { color: #2f5bd3; }
  code { overflow-wrap: anywhere; }
</style>
</head>
<body>
<main>
<h1>No such counter</h1>
<p>There is no counter at <code>{path}</code>.</p>
<p>A counter's name is 1 to 64 letters (A-Z, a-z), digits, hyphens and underscores,
as in <code>/c/team-42</code>.</p>
<p><a href="/">Go to the main counter</a></p>
</main>
</body>
</html>
"""


class Web:
    """Answers the requests that are not (yet) WebSockets, for one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.page = PAGE.read_text(encoding="utf-8")
        # The HTTP API for backends, with --api-key-file only: else /api/ is 404.
        self.api = Api(hub, list(hub.settings.api_keys)) if hub.settings.api_keys else None
        # One warning per client address per interval and per kind, however
        # fast it knocks.
        self.refusals = ThrottleByKey()
        self.malformed = ThrottleByKey()
        self.over_rate = ThrottleByKey()

    def process_request(
        self, websocket: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        """Answer plain HTTP requests; let allowed WebSocket upgrades to a room through.

        ``/`` and ``/c/<name>`` are rooms: a GET is the page, an upgrade joins.
        The target is read here and only here: the room rides on the
        connection to the hub. A request that cannot be read one way (a
        single-valued header repeated, a value that does not parse) gets 400
        with the reason, whatever it asked for; plain requests beyond the
        client address's rate get 429.
        """
        assert isinstance(websocket, Connection)
        path, query = _split_target(request.path)
        room = room_from_path(path)
        upgrade = "websocket" in _list_header(request.headers, "Upgrade").lower()
        if room is not None:
            websocket.endpoint = "websocket" if upgrade else "page"
        elif path.startswith(API_PREFIX) or path == API_PREFIX.rstrip("/"):
            websocket.endpoint = "api"
        else:
            websocket.endpoint = _ENDPOINTS.get(path, "other")
        try:
            address = self._identify(websocket, request.headers)
        except _MALFORMED as exc:
            # Behind a proxy the client is unknown here: charging the proxy's
            # address would charge everyone behind it.
            known = not self.hub.gate.is_trusted(websocket.peer_ip)
            return self._bad_request(websocket, websocket.peer_ip, exc, charge=known)
        plain = websocket.endpoint != "websocket"  # upgrades have the caps instead
        if plain and (retry_after := self._charge(address, websocket)) is not None:
            return self._too_many_requests(websocket, address, retry_after)
        try:
            if room is not None and upgrade:
                return self._check_upgrade(websocket, request, address, room, query)
            return self._answer(websocket, request, path, query, upgrade=upgrade)
        except _MALFORMED as exc:
            # A plain request paid already; an upgrade is the caps' business.
            return self._bad_request(websocket, address, exc, charge=False)

    def _identify(self, websocket: Connection, headers: Headers) -> str:
        """The client's address as the caps count it; the log lines name it from now on.

        Raises :exc:`MalformedRequest` for a single-valued header repeated
        (two would make us guess which counts) or a garbled forwarded address.
        """
        for name in _SINGLE_HEADERS:
            if len(headers.get_all(name)) > 1:
                raise MalformedRequest(f"repeated {name} header")
        address = self.hub.gate.client_address(websocket.peer_ip, headers.get("X-Forwarded-For"))
        if address != websocket.peer_ip:
            websocket.client = address
        websocket.address = address
        return address

    def _charge(self, address: str, websocket: Connection) -> int | None:
        """Spend one of ``address``'s plain requests: None, or the seconds until it has one."""
        return self.hub.gate.requests.retry_after(address, websocket.loop.time())

    def _answer(
        self, websocket: Connection, request: Request, path: str, query: str, *, upgrade: bool
    ) -> Response | Awaitable[Response]:
        """A plain request's answer: the page, an endpoint, or 404 (the API's, to await)."""
        endpoint = websocket.endpoint
        if endpoint == "api" and self.api is not None:
            return self.api.respond(websocket, request, path, query)
        if endpoint == "page":
            return _respond(websocket, http.HTTPStatus.OK, self.page, "text/html; charset=utf-8")
        if endpoint == "healthz":
            return self._health(websocket)
        if endpoint == "readyz":
            return self._readiness(websocket)
        if endpoint == "admission":
            return self._admission(websocket, request, query)
        if endpoint == "metrics":
            return self._metrics(websocket, request)
        if endpoint == "favicon":
            return _no_content(websocket)  # the page's icon is inline; this is for the rest
        if path.startswith("/c/") and not upgrade:
            # A person typed or followed it: say what a counter's address looks like.
            body = _NOT_A_COUNTER.replace("{path}", html.escape(path))
            return _respond(websocket, http.HTTPStatus.NOT_FOUND, body, "text/html; charset=utf-8")
        return websocket.respond(http.HTTPStatus.NOT_FOUND, "Not found\n")

    def _check_upgrade(
        self, websocket: Connection, request: Request, address: str, room: str, query: str
    ) -> Response | None:
        """Let the upgrade through, with its room and session on the connection, or refuse it."""
        headers = request.headers
        params = _query_params(query)
        session = params.get("session")
        if session is not None and not _SESSION.fullmatch(session):
            raise MalformedRequest("bad session: 16 to 64 characters of A-Z a-z 0-9 _ -")
        admitted = self.hub.admit(
            room,
            address=address,
            headers=headers,
            token=_token_of(headers, params),
            spend=True,
        )
        if isinstance(admitted, Grant):
            websocket.room, websocket.session, websocket.grant = room, session, admitted
            return None
        refusal = admitted
        self.hub.metrics.handshakes_rejected.labels(refusal.kind).inc()
        detail = refusal.detail
        # Each of them once at most: identify() made sure.
        origin, host = headers.get("Origin"), headers.get("Host")
        if refusal.kind == "origin" and origin and split_origin(origin).netloc == host:
            # The server's own page, opened by a name: only the operator can
            # vouch for the name, since a DNS-rebinding page looks the same.
            detail += (
                ": a page of this server opened by a name; if that name is this "
                f"server's, add --origin {origin} to accept it"
            )
        self.refusals.warning(
            address_key(address),
            log,
            "%s rejected: %s",
            websocket.client,
            detail,
            **fields(
                "rejected",
                peer=websocket.client,
                room=room,
                code=int(refusal.status),
                reason=refusal.reason,
            ),
        )
        return websocket.respond(refusal.status, f"{refusal.reason}\n")

    def _bad_request(
        self, websocket: Connection, address: str, exc: Exception, *, charge: bool
    ) -> Response:
        """400 with the reason in one line, and a warning throttled per client address.

        With ``charge``, the request costs ``address`` one of its plain
        requests first: 429 if it has none left.
        """
        if charge and (retry_after := self._charge(address, websocket)) is not None:
            return self._too_many_requests(websocket, address, retry_after)
        reason = _malformed_reason(exc)
        if websocket.endpoint == "websocket":
            self.hub.metrics.handshakes_rejected.labels("malformed").inc()
        self.malformed.warning(
            address_key(address),
            log,
            "%s sent a malformed request: %s",
            websocket.client,
            reason,
            **fields("rejected", peer=websocket.client, code=400, reason=reason),
        )
        return websocket.respond(http.HTTPStatus.BAD_REQUEST, f"{reason}\n")

    def _too_many_requests(self, websocket: Connection, address: str, retry_after: int) -> Response:
        """429 with ``Retry-After``; a warning, throttled per client address."""
        settings = self.hub.settings
        self.over_rate.warning(
            address_key(address),
            log,
            "%s is over the HTTP request rate (%g a second, %d at once): 429",
            websocket.client,
            settings.http_rate,
            settings.http_burst,
            **fields("rejected", peer=websocket.client, code=429, reason="too many requests"),
        )
        response = websocket.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "too many requests\n")
        response.headers["Retry-After"] = str(retry_after)
        return response

    def _health(self, websocket: ServerConnection) -> Response:
        """Liveness: 200 while the process serves, with what it holds."""
        body = {
            "status": "ok",
            "users": self.hub.count_here(),
            "rooms": self.hub.count_rooms_in_use(),
            "value": self.hub.rooms[DEFAULT_ROOM].state.value,
            "store": "ok" if self.hub.store.healthy() else "unavailable",
        }
        return _respond(websocket, http.HTTPStatus.OK, json.dumps(body) + "\n", "application/json")

    def _readiness(self, websocket: ServerConnection) -> Response:
        """Readiness: 503 while the store is unreachable or the server drains."""
        reason = self.hub.not_ready()
        body: dict[str, object] = {"ready": reason is None}
        status = http.HTTPStatus.OK
        if reason is not None:
            body["reason"] = reason
            status = http.HTTPStatus.SERVICE_UNAVAILABLE
        return _respond(websocket, status, json.dumps(body) + "\n", "application/json")

    def _metrics(self, websocket: ServerConnection, request: Request) -> Response:
        """The Prometheus scrape, in the format the scraper asked for."""
        accept = _list_header(request.headers, "Accept")
        body, content_type = self.hub.metrics.exposition(accept or None)
        response = websocket.respond(http.HTTPStatus.OK, "")
        response.body = body
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = content_type
        response.headers["Content-Length"] = str(len(body))
        return response

    def _admission(self, websocket: Connection, request: Request, query_string: str) -> Response:
        """Would a WebSocket to this room, from this page, be let in now? Why not?

        The page says its own origin in the query: a same-origin fetch sends
        no Origin header. Nothing is granted here, so the answer is for anyone
        (``Access-Control-Allow-Origin: *``).
        """
        query = _query_params(query_string)
        name = query.get("room", DEFAULT_ROOM)
        room = DEFAULT_ROOM if name == DEFAULT_ROOM else room_from_path(f"/c/{name}")
        admitted: Grant | Refusal
        if room is None:
            admitted = Refusal(http.HTTPStatus.NOT_FOUND, "no such counter", name, "path")
        else:
            headers = Headers(request.headers)
            if "Origin" in headers:
                del headers["Origin"]
            if "origin" in query:
                headers["Origin"] = query["origin"]
            admitted = self.hub.admit(
                room,
                address=websocket.address,
                headers=headers,
                token=_token_of(headers, query),
                spend=False,
            )
        answer: dict[str, object] = {"admitted": isinstance(admitted, Grant)}
        if isinstance(admitted, Refusal):
            answer.update(status=int(admitted.status), reason=admitted.reason)
        elif admitted.read_only is not None:
            answer["read_only"] = admitted.read_only
        response = _respond(
            websocket, http.HTTPStatus.OK, json.dumps(answer) + "\n", "application/json"
        )
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Cache-Control"] = "no-store"
        return response


def _split_target(target: str) -> tuple[str, str]:
    """A request target's path and query; the path is "" unless the target is in origin-form.

    Origin-form (RFC 9112 3.2.1) is what a browser sends: a path from ``/``,
    maybe a query, no fragment. ``//host/c/x`` or ``http://host/c/x``
    names no room here, whatever a URL parser would make of it.
    """
    path, _, query = target.partition("?")
    if not path.startswith("/") or path.startswith("//") or "#" in target:
        return "", ""
    return path, query


def _list_header(headers: Headers, name: str) -> str:
    """A list-valued header's values as one, the way RFC 9110 5.3 combines repeated lines."""
    return ", ".join(headers.get_all(name))


def _malformed_reason(exc: Exception) -> str:
    """What was wrong with a malformed request, in one line for the client and the log."""
    if isinstance(exc, MultipleValuesError):
        return f"repeated {exc.args[0]} header"
    if isinstance(exc, InvalidHeader):
        return f"invalid {exc.name} header"
    return str(exc)


def _query_params(query: str) -> dict[str, str]:
    """A query's parameters, the first of each name (a repeated one is not read twice)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, value)
    return params


def _token_of(headers: Headers, params: dict[str, str]) -> str | None:
    """The token a request carries: ``Authorization: Bearer`` (scripts) or ``?token=`` (pages)."""
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return params.get("token") or None


def _no_content(websocket: ServerConnection) -> Response:
    response = websocket.respond(http.HTTPStatus.NO_CONTENT, "")
    # A 204 carries no body, so no Content-Length or Content-Type (RFC 9110).
    del response.headers["Content-Length"]
    del response.headers["Content-Type"]
    return response


def _respond(
    websocket: ServerConnection, status: http.HTTPStatus, body: str, content_type: str
) -> Response:
    response = websocket.respond(status, body)
    # Headers is a multi-dict: assigning would add a second Content-Type.
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response
