"""The HTTP side of the port: the page, the health check, and the gate for upgrades.

The library calls :func:`process_request` for every request before its
handshake. A plain GET gets an answer here; a WebSocket upgrade gets through
only if admission lets it (:mod:`counter_sync.admission`).
"""

from __future__ import annotations

import http
import json
import logging
from importlib import resources
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from counter_sync.admission import Refusal, refuse_upgrade
from counter_sync.fanout import format_peer
from counter_sync.hub import Hub, room_from_path
from counter_sync.store import DEFAULT_ROOM

__all__ = ["PAGE", "process_request"]

log = logging.getLogger("counter-sync")

# client.html at the top of the repository is the one source: the package
# holds a symbolic link to it, which a wheel turns into a copy.
PAGE = resources.files("counter_sync") / "client.html"


def process_request(hub: Hub, websocket: ServerConnection, request: Request) -> Response | None:
    """Answer plain HTTP requests; let allowed WebSocket upgrades to a room through.

    ``/`` and ``/c/<name>`` are rooms: a GET is the page, an upgrade joins.
    """
    path = urlsplit(request.path).path
    room = room_from_path(path)
    upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
    if room is not None and upgrade:
        return check_upgrade(hub, websocket, request, room)
    if room is not None:
        return html_response(websocket, PAGE.read_text(encoding="utf-8"))
    if path == "/healthz":
        return health(hub, websocket)
    return websocket.respond(http.HTTPStatus.NOT_FOUND, "Not found\n")


def check_upgrade(
    hub: Hub, websocket: ServerConnection, request: Request, room: str
) -> Response | None:
    refusal = refuse_upgrade(
        hub.settings,
        origin=request.headers.get("Origin"),
        host=request.headers.get("Host"),
        users=hub.count_here(),
    )
    if refusal is None and (reason := hub.refuse_room(room)) is not None:
        refusal = Refusal(http.HTTPStatus.SERVICE_UNAVAILABLE, reason, f"{reason} ({room})")
    if refusal is None:
        return None
    log.warning("%s rejected: %s", format_peer(websocket), refusal.detail)
    return websocket.respond(refusal.status, f"{refusal.reason}\n")


def health(hub: Hub, websocket: ServerConnection) -> Response:
    healthy = hub.store.healthy()
    body = {
        "status": "ok" if healthy else "store unavailable",
        "users": hub.count_here(),
        "rooms": sum(1 for room in hub.rooms.values() if room.users),
        "value": hub.rooms[DEFAULT_ROOM].value,
    }
    status = http.HTTPStatus.OK if healthy else http.HTTPStatus.SERVICE_UNAVAILABLE
    response = websocket.respond(status, json.dumps(body) + "\n")
    set_content_type(response.headers, "application/json")
    return response


def html_response(websocket: ServerConnection, page: str) -> Response:
    response = websocket.respond(http.HTTPStatus.OK, page)
    set_content_type(response.headers, "text/html; charset=utf-8")
    return response


def set_content_type(headers: Headers, value: str) -> None:
    # Headers is a multi-dict: assigning would add a second Content-Type.
    del headers["Content-Type"]
    headers["Content-Type"] = value
