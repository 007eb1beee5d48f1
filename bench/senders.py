"""Inside a load process of ``python -m bench``: senders, for the ingest phase.

A sender is one connection that writes actions as fast as it can: plain
``{"action": "plus"}``, or, connected with ``?session=<id>``, numbered ops
(``"op": N``) whose acks it waits for only at the end, as the page does when a
user clicks fast. :class:`SenderWorker` adds their commands to
:class:`bench.listeners.Worker`; it is defined at module level so that the
spawned processes can import it.
"""

from __future__ import annotations

import asyncio
import json
import time

from bench.listeners import PLUS, Group, Reply, Worker, summarize_errors
from counter_sync.client import new_session

try:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport
except ImportError:  # pragma: no cover - reported by LoadGen.start()
    WSListener = object  # type: ignore[misc,assignment]

__all__ = ["MODES", "Sender", "SenderWorker"]

# The two ways the ingest phase sends: without a session, and with one.
MODES = ("plain", "sessions")


class Sender(WSListener):
    """One connection that sends actions; with a session, it notes when its last op is acked.

    It reads the server's frames only for acks and error events: the
    listeners time the value.
    """

    def __init__(self, group: Group, *, session: bool) -> None:
        super().__init__()
        self.group = group
        self.session = session
        self.transport: WSTransport | None = None
        self.ready = False  # it got its state (and, with a session, its first ack)
        self.value: int | None = None
        self.sent = 0  # actions sent so far: with a session, the last op sent
        self.target = 0  # the op whose ack ends the current round
        self.acked = 0  # the last op acked: acks are cumulative
        self.acked_at: float | None = None  # when `target` was acked
        self.acks = 0  # ack frames this round: one per flush that took its ops
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            try:
                event = json.loads(frame.get_payload_as_bytes())
                kind = event["type"]
                if kind == "ack":
                    self.on_ack(int(event["op"]), time.monotonic())
                elif kind == "state":
                    self.value = int(event["value"])
                    if not self.session:
                        self.on_ready()
                elif kind == "error":
                    self.group.errors += 1
            except (ValueError, TypeError, KeyError):
                self.group.errors += 1
        elif frame.msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close()
            transport.disconnect()

    def on_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.group.changed.set()

    def on_ack(self, op: int, now: float) -> None:
        # The first ack, after users and state, says what the server holds as done.
        self.on_ready()
        self.acks += 1
        self.acked = max(self.acked, op)
        if self.acked_at is None and self.target and self.acked >= self.target:
            self.acked_at = now
            self.group.changed.set()

    def next_actions(self, count: int) -> list[bytes]:
        """The next ``count`` actions, numbered after the last one with a session.

        Built before the burst starts, so that the clock measures the server
        and not this process formatting numbers.
        """
        first, self.sent = self.sent + 1, self.sent + count
        if not self.session:
            return [PLUS] * count
        return [b'{"action": "plus", "op": %d}' % op for op in range(first, self.sent + 1)]

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.group.changed.set()


class SenderWorker(Worker):
    """A load process that also holds the ingest phase's senders, by mode."""

    def __init__(self, source_ip: str | None) -> None:
        super().__init__(source_ip)
        self.senders: dict[str, list[Sender]] = {mode: [] for mode in MODES}
        self.sender_group = Group()

    async def senders_connect(self, url: str, mode: str, count: int, limit: float) -> Reply:
        """Open `count` senders of `mode`; return once each has its state (and first ack)."""
        session = mode == "sessions"
        group = self.sender_group

        async def one(_index: int) -> Sender:
            target = f"{url}?session={new_session()}" if session else url
            sender: Sender = await self.open(lambda: Sender(group, session=session), target, limit)
            self.senders[mode].append(sender)
            return sender

        # A few dozen handshakes: all in flight at once, within `limit`.
        results = await self.gated(count, count, limit, one)
        senders = self.senders[mode]
        await group.until(lambda: all(s.ready or s.closed for s in senders), limit)
        failed = sum(isinstance(r, BaseException) for r in results)
        return {
            "connected": count - failed,
            "ready": sum(s.ready for s in senders),
            "value": max((s.value for s in senders if s.value is not None), default=None),
            "errors": summarize_errors(results),
        }

    async def senders_send(self, mode: str, count: int, start_at: float) -> Reply:
        """At `start_at` on the shared clock, `count` actions from each sender, round robin.

        All are written at once, without waiting for a reply: a burst from
        many users at the same time.
        """
        senders = [s for s in self.senders[mode] if not s.closed and s.transport is not None]
        for sender in senders:
            sender.target = sender.sent + count if sender.session else 0
            sender.acked_at = None
            sender.acks = 0
        self.sender_group.errors = 0
        bursts = [
            (sender.transport, sender.next_actions(count))
            for sender in senders
            if sender.transport is not None  # as filtered above: for mypy
        ]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()
        for index in range(count):
            for transport, actions in bursts:
                transport.send(WSMsgType.TEXT, actions[index])
        return {
            "started": started,
            "writing": time.monotonic() - started,  # how long this process took to write them
            "senders": len(senders),
            "sent": count * len(senders),
        }

    async def senders_wait(self, mode: str, limit: float) -> Reply:
        """With sessions, wait until every sender's last op is acked; the errors either way."""
        senders = self.senders[mode]
        numbered = [s for s in senders if s.session]

        def done() -> bool:
            return all(s.acked_at is not None or s.closed for s in numbered)

        await self.sender_group.until(done, limit)
        times = [s.acked_at for s in numbered if s.acked_at is not None]
        return {
            "acked": len(times),
            "numbered": len(numbered),
            "open": sum(not s.closed for s in senders),
            "last": max(times, default=None),
            "acks": sum(s.acks for s in numbered),
            "errors": self.sender_group.errors,
        }

    async def reset(self) -> Reply:
        for sender in (s for senders in self.senders.values() for s in senders):
            if sender.transport is not None:
                sender.transport.disconnect(graceful=False)
        self.senders = {mode: [] for mode in MODES}
        self.sender_group = Group()
        return await super().reset()
