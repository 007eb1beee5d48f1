"""WebSocket clients on plain sockets: they send what they like and read only if asked.

A well-behaved library answers pings, reads what it is sent and masks frames
with random keys; an attacker does none of that. These clients do the
handshake and then leave every byte to the caller: :class:`RawClient` on
asyncio streams (for tests and coroutines), :func:`raw_websocket` on a
blocking socket (for attacking processes that hold thousands). Each can
connect from any loopback address, because a server's caps are per client
address and Linux routes all of 127.0.0.0/8 to the loopback device.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

from testkit.processes import TIMEOUT

__all__ = [
    "HOST",
    "IP_BIND_ADDRESS_NO_PORT",
    "SMALL_RCVBUF",
    "RawClient",
    "bound_socket",
    "check_upgraded",
    "client_frame",
    "connected_socket",
    "raw_websocket",
    "read_upgrade",
    "tcp_open",
    "upgrade_request",
]

HOST = "127.0.0.1"  # where the server under test listens
# Linux's IP_BIND_ADDRESS_NO_PORT (Python 3.11 lacks the name): bind the source
# address now, pick the port at connect(): 20,000 sockets from one address fit.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TCP_ESTABLISHED = 1  # tcpi_state in TCP_INFO
# A client that never reads also offers a small window: the server's writes
# back up after a few KiB instead of the hundreds of KiB of an autotuned buffer.
SMALL_RCVBUF = 4096


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame; a mask of zeros is legal and leaves the payload as it is."""
    if len(payload) >= 126:
        raise ValueError("only payloads under 126 bytes fit the short header")
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + b"\0\0\0\0" + payload


def upgrade_request(port: int, path: str = "/") -> bytes:
    """An opening handshake with a fresh key, for the server at ``HOST:port``."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def check_upgraded(head: bytes) -> None:
    """Raise :exc:`ConnectionError` unless ``head`` is the server's 101 response."""
    if not head.startswith(b"HTTP/1.1 101"):
        status = head.partition(b"\r\n")[0].decode(errors="replace")
        raise ConnectionError(f"refused: {status}")


def read_upgrade(sock: socket.socket) -> None:
    """Read the handshake's response head from ``sock``, blocking; as :func:`check_upgraded`."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    check_upgraded(head)


def bound_socket(source: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A TCP socket from ``source``, not connected yet; its port is picked at connect()."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if rcvbuf is not None:
            # Before connect: the window offered in the handshake follows it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def connected_socket(port: int, source: str) -> socket.socket:
    """A non-blocking TCP socket from ``source`` connected to ``HOST:port``; nothing sent yet.

    Pass it to ``websockets``' ``connect(sock=...)`` for a client from that
    address, or hold it as a silent connection.
    """
    sock = bound_socket(source)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def raw_websocket(
    port: int,
    source: str,
    *,
    path: str = "/",
    rcvbuf: int | None = None,
    timeout: float = TIMEOUT,
) -> socket.socket:
    """A WebSocket on a plain blocking socket, handshake done: it sends and reads only if told.

    Raises :exc:`ConnectionError` if the server refuses the handshake, and
    :exc:`OSError` if the connection fails.
    """
    sock = bound_socket(source, rcvbuf=rcvbuf)
    try:
        sock.settimeout(timeout)
        sock.connect((HOST, port))
        sock.sendall(upgrade_request(port, path))
        read_upgrade(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_open(sock: socket.socket) -> bool:
    """Whether the connection is still established, asked of the kernel without reading."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED
    except OSError:
        return False


class RawClient:
    """A WebSocket client on asyncio streams, handshake done; ``reader`` and ``writer`` are open.

    It reads nothing unless the caller does: pings go unanswered and the
    server's messages pile up in the kernel once :meth:`stop_reading` is called.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, source: str = HOST, path: str = "/") -> RawClient:
        """Connect from ``source`` and do the handshake; :exc:`ConnectionError` if refused."""
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        try:
            writer.write(upgrade_request(port, path))
            async with asyncio.timeout(TIMEOUT):
                check_upgraded(await reader.readuntil(b"\r\n\r\n"))
        except BaseException:
            writer.transport.abort()
            raise
        return cls(reader, writer)

    def stop_reading(self) -> None:
        """Read nothing more, with a small receive buffer: the server's writes back up sooner."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)

    def frames(self, opcode: int, payload: bytes, count: int) -> bytes:
        """``count`` copies of one :func:`client_frame`, to write in one go."""
        return client_frame(opcode, payload) * count

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def abort(self) -> None:
        """Drop the connection without a closing handshake."""
        self.writer.transport.abort()
