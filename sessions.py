"""The session registry: slots, pending offers, liveness and teardown.

A session counts against ``--max_session`` from its offer. Until its peer connects
it is *pending*: pending sessions have their own small limits (``--max_pending`` in
all, ``--max_pending_per_address`` per client address), render nothing (the worker
starts on connection) and are dropped after ``--connect_timeout`` seconds, so a flood
of offers that never connect cannot lock real users out.

A connected peer that vanishes is found from the absence of RTCP on the session's
transports: every WebRTC receiver reports back (receiver reports, feedback) about
once a second, so ``--peer_timeout`` seconds without any RTCP packet from the peer
closes the session (instead of ICE consent expiry after ~30 s). Every close is
counted by reason in ``avatar_sessions_closed_total``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

    from basereal import BaseReal
    from events import EventBus
    from metrics import Metrics

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 16  # 128-bit, unguessable (secrets.token_hex)
TOKEN_BYTES = 24  # per-session bearer token, 192-bit
WATCH_INTERVAL_S = 0.5  # how often liveness is checked


class Session:
    """A peer connection, its worker, its event bus and its access token.

    Attributes:
        address: the client address its offer came from.
        connected: the peer has connected at least once (speech is accepted).
        last_rtcp: monotonic time (s) of the last RTCP packet from the peer.
    """

    def __init__(self, pc: "RTCPeerConnection", worker: "BaseReal", bus: "EventBus", address: str,
                 session_id: str | None = None) -> None:
        self.id = session_id or secrets.token_hex(SESSION_ID_BYTES)
        self.token = secrets.token_urlsafe(TOKEN_BYTES)
        self.pc = pc
        self.worker = worker
        self.bus = bus
        self.address = address
        self.created = time.monotonic()
        self.connected = False
        self.last_rtcp = self.created
        self.agent = None  # converse.ChatAgent, made on the session's first chat
        self.mic: str | None = None  # "lipsync" or "converse" when its own peer feeds the microphone
        self.closed = False

    def watch_rtcp(self) -> None:
        """Stamp :attr:`last_rtcp` whenever the peer's RTCP reaches us."""
        on_rtcp(self.pc, lambda: setattr(self, "last_rtcp", time.monotonic()))


def on_rtcp(pc: "RTCPeerConnection", heard: Any) -> None:
    """Call ``heard()`` on every RTCP packet from ``pc``'s peer: receiver reports reach
    our senders, sender reports our receivers (aiortc has no event for either, so
    their packet handlers are wrapped)."""
    for part in [*pc.getSenders(), *pc.getReceivers()]:
        handle = part._handle_rtcp_packet

        async def stamped(packet, handle=handle):
            heard()
            return await handle(packet)

        part._handle_rtcp_packet = stamped


class SessionRegistry:
    """Owns the open sessions and their limits.

    Args:
        args: the server options (``max_session``, ``max_pending``,
            ``max_pending_per_address``, ``connect_timeout``, ``peer_timeout``).
        metrics: the server's metrics (open sessions gauge, close reasons).
    """

    def __init__(self, args: Any, metrics: "Metrics") -> None:
        self.args = args
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._watchdog: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> Session | None:
        s = self.sessions.get(session_id)
        return None if s is None or s.closed else s

    def pending(self, address: str | None = None) -> int:
        return sum(1 for s in self.sessions.values() if not s.connected and (address is None or s.address == address))

    def admit(self, address: str) -> tuple[int, str] | None:
        """Why an offer from ``address`` cannot get a slot now, as (status, message); None if it can."""
        a = self.args
        if len(self.sessions) >= a.max_session:
            return 503, f"server full: {len(self.sessions)}/{a.max_session} sessions"
        if self.pending() >= a.max_pending:
            return 503, f"too many sessions still connecting ({a.max_pending}); retry in {a.connect_timeout:g} s"
        if self.pending(address) >= a.max_pending_per_address:
            return 429, f"this address already has {a.max_pending_per_address} sessions connecting"
        return None

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.metrics.sessions.set(len(self.sessions))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())

    def on_connected(self, session: Session) -> None:
        """The peer connected: start rendering and start the RTCP clock."""
        if session.closed or session.connected:
            return
        session.connected = True
        session.last_rtcp = time.monotonic()
        session.watch_rtcp()
        session.worker.start()

    async def close(self, session: Session, reason: str) -> None:
        """Close ``session`` (idempotent): stop its worker off the loop, end its events,
        close its peer connection; an error in the clean-up is logged once and the
        slot is freed all the same."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.session_closed(reason)
        log.info("session %s closed: %s (%d open)", session.id[:8], reason, len(self.sessions))
        if session.agent is not None:
            session.agent.close()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, session.worker.stop)
            session.bus.close()
            await session.pc.close()
            # aiortc's peer connection lives in reference cycles of its own that only the
            # cyclic GC's rare full collections free. Detach what of ours it holds (the
            # tracks, which hold the worker and its frames; watch_rtcp's hooks, which hold
            # the session) so that reference counting frees the session at once.
            for sender in session.pc.getSenders():
                sender.replaceTrack(None)
            for part in [*session.pc.getSenders(), *session.pc.getReceivers()]:
                vars(part).pop("_handle_rtcp_packet", None)  # undo Session.watch_rtcp
        except Exception:
            log.exception("session %s: error while closing (slot freed anyway)", session.id[:8])
        finally:
            self.metrics.remove(session.id)
            trim_heap_when_freed(session.worker, loop)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(s, reason) for s in list(self.sessions.values())))
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _watch(self) -> None:
        """Drop sessions that never connected, and connected ones whose peer went silent."""
        a = self.args
        while self.sessions:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if not s.connected and now - s.created > a.connect_timeout:
                    await self.close(s, "connect_timeout")
                elif s.connected and a.peer_timeout > 0 and now - s.last_rtcp > a.peer_timeout:
                    await self.close(s, "peer_silent")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):  # not glibc
        pass


def trim_heap_when_freed(obj: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Once ``obj`` is freed, return the C heap's free pages to the OS (glibc's
    ``malloc_trim``, ~2 ms, on the loop's executor). A session's frames (~0.4 MB
    each) are made in per-thread malloc arenas that glibc otherwise keeps."""

    def trim_off_loop() -> None:
        try:
            loop.run_in_executor(None, _malloc_trim)
        except RuntimeError:  # executor shut down
            pass

    def freed() -> None:  # in whichever thread let go of ``obj`` last
        try:
            loop.call_soon_threadsafe(trim_off_loop)
        except RuntimeError:  # the loop has closed
            pass

    weakref.finalize(obj, freed).atexit = False
