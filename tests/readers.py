"""Readers in a process of their own: WebSocket clients that read everything, as fast as they can.

A test that needs a big room whose broadcasts are really written (and not
skipped, as they would be for clients that do not read) runs this as a child
process: ``python -m tests.readers PORT PATH COUNT`` opens ``COUNT``
WebSockets to ``PATH``, prints ``reading COUNT`` once all are open, then
reads and drops every byte until it is killed. In the test's own process,
their reading would take the event loop from the server under test.
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys

from testkit.processes import TIMEOUT
from testkit.rawclient import HOST, bound_socket, read_upgrade, upgrade_request

__all__ = ["BATCH", "READY", "main"]

# Handshakes sent before their answers are read: within the server's default
# --max-pending (1,000), and enough to keep it busy.
BATCH = 256
READY = "reading"  # the line printed once every handshake is done


def main() -> None:
    port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 64)), hard))
    selector = selectors.DefaultSelector()
    for start in range(0, count, BATCH):
        for sock in opened(port, path, min(BATCH, count - start)):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
    print(f"{READY} {count}", flush=True)
    while True:
        for key, _ in selector.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                if not ready.recv(65536):
                    selector.unregister(ready)
            except BlockingIOError:
                pass


def opened(port: int, path: str, count: int) -> list[socket.socket]:
    """``count`` WebSockets: every handshake sent, then every answer read (the server does them
    at once)."""
    socks = []
    try:
        for _ in range(count):
            sock = bound_socket(HOST)
            socks.append(sock)
            sock.settimeout(TIMEOUT)
            sock.connect((HOST, port))
            sock.sendall(upgrade_request(port, path))
        for sock in socks:
            read_upgrade(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


if __name__ == "__main__":
    main()
