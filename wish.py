"""WISH signalling (WebRTC-HTTP: WHIP, RFC 9725; WHEP, draft-ietf-wish-whep-03): the parts both share.

A WHEP viewer or a WHIP publisher is a *resource*: one peer connection attached to
a session, created by ``POST`` of an SDP offer (``201 Created``, the answer, and its
URL in ``Location``), ended by ``DELETE`` on that URL. This module holds:

- :func:`read_sdp`: the offer body, bounded (``Content-Type: application/sdp`` or
  415, at most ``webrtc.MAX_SDP_BYTES`` or 413, within ``--request_timeout`` or 408).
- :class:`Resource` and :class:`Resources`: per-session bookkeeping and limits, and
  one watchdog that ends a resource whose peer never connected
  (``--connect_timeout``), went silent (no RTCP for ``--peer_timeout`` s, as
  ``sessions.py`` does for a session's own peer) or failed, and every resource of a
  session that closed. A resource's end never touches its session.
- The shared answers: ``DELETE`` (200), ``PATCH`` (405 with ``Allow``: these
  endpoints support neither trickle ICE nor ICE restarts; RFC 9725 section 4.3.1 and
  the WHEP draft's same section say 405 then), ``OPTIONS`` (204 with ``Accept-Post:
  application/sdp`` and the allowed methods, without PATCH, which tells clients
  such as Eyevinn's to send their candidates in the offer).
- :class:`SessionLocks` and :class:`PerSession`: the bookkeeping of what a session
  publishes elsewhere, one at a time (``whip.Pushes``, ``janus.JanusFanout``).

Offers without candidates are accepted (players that POST before gathering, like
``whip-whep``'s WHEP client): ICE learns their address from their checks against
the candidates in our answer (peer-reflexive candidates, RFC 8445 section 7.3.1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Generic, TypeVar

from aiohttp import web
from aiortc import RTCSessionDescription

from api import HTTPError
from sessions import on_rtcp
from webrtc import MAX_SDP_BYTES, check_offer

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

    from sessions import Session

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
RESOURCE_ID_BYTES = 12  # 96-bit resource ids (unguessable; DELETE also needs the session's token)
WATCH_INTERVAL_S = 0.5  # how often the watchdogs look at resources and PerSession entries
RESOURCE_METHODS = "DELETE, OPTIONS"  # what a resource URL supports (the Allow of PATCH's 405)
ENDPOINT_METHODS = "POST, OPTIONS"  # what an endpoint URL supports

E = TypeVar("E")  # an entry of PerSession


async def read_sdp(request: web.Request, timeout: float) -> str:
    """The SDP offer of a WHIP/WHEP ``POST``.

    Raises:
        HTTPError: 415 (not ``application/sdp``), 413 (over MAX_SDP_BYTES),
            408 (not received within ``timeout`` s), 400 (empty or not UTF-8).
    """
    if request.content_type != SDP_TYPE:
        raise HTTPError(415, f"Content-Type must be {SDP_TYPE} (the SDP offer), got {request.content_type[:60]!r}")
    if request.content_length is not None and request.content_length > MAX_SDP_BYTES:
        raise HTTPError(413, f"offer of {request.content_length} bytes exceeds {MAX_SDP_BYTES}")
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(1 << 14):
                data.extend(chunk)
                if len(data) > MAX_SDP_BYTES:
                    raise HTTPError(413, f"offer exceeds {MAX_SDP_BYTES} bytes")
    except TimeoutError as e:
        raise HTTPError(408, f"offer not received within {timeout:g} s") from e
    try:
        sdp = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"the offer is not UTF-8: {e.reason}") from e
    if not sdp.strip():
        raise HTTPError(400, "empty offer: POST the SDP offer as the body")
    return sdp


def check_wish_offer(sdp: str, send: bool) -> None:
    """``webrtc.check_offer`` for WHIP (``send``) or WHEP offers; candidates optional.
    Raises HTTPError(400) with what is wrong."""
    try:
        check_offer(sdp, send=send, candidates=False)
    except ValueError as e:
        raise HTTPError(400, f"bad offer: {e}") from e


def created(answer_sdp: str, location: str, headers: dict[str, str] | None = None) -> web.Response:
    """``201 Created`` with the SDP answer and the resource's ``Location``."""
    return web.Response(status=201, body=answer_sdp.encode(), content_type=SDP_TYPE,
                        headers={"Location": location, "Access-Control-Expose-Headers": "Location",
                                 **(headers or {})})


class Resource:
    """A peer connection attached to a session (a WHEP viewer or a WHIP publisher).

    Attributes:
        kind: "whep" or "whip" (the URL prefix).
        id: random hex id; its URL is ``/<kind>/<session id>/<id>``.
        connected: its peer connected at least once.
        last_heard: monotonic time (s) of the last RTCP packet from its peer.
        owns_session: DELETE of this resource closes the session too (``POST /whep``
            without a session id made the session for it).
        on_close: called (awaited) once when the resource ends.
    """

    def __init__(self, kind: str, session: "Session", pc: "RTCPeerConnection", owns_session: bool = False) -> None:
        self.kind = kind
        self.id = session.id if owns_session else secrets.token_hex(RESOURCE_ID_BYTES)
        self.session = session
        self.pc = pc
        self.owns_session = owns_session
        self.created = time.monotonic()
        self.connected = False
        self.last_heard = self.created
        self.closed = False
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.session.id}/{self.id}"

    def watch_rtcp(self) -> None:
        """Stamp :attr:`last_heard` on every RTCP packet from the peer (receiver reports
        reach our senders, sender reports our receivers)."""
        on_rtcp(self.pc, lambda: setattr(self, "last_heard", time.monotonic()))


class Resources:
    """The WHIP/WHEP resources of one server, by session.

    Args:
        registry: the server's ``sessions.SessionRegistry`` (``close`` for resources
            that own their session).
        args: server options (``connect_timeout``, ``peer_timeout``).
    """

    def __init__(self, registry: Any, args: Any) -> None:
        self.registry = registry
        self.args = args
        self.by_id: dict[str, Resource] = {}
        self._watchdog: asyncio.Task | None = None

    def count(self, session: "Session", kind: str) -> int:
        """Open resources of ``kind`` on ``session``."""
        return sum(1 for r in self.by_id.values() if r.session is session and r.kind == kind)

    def get(self, kind: str, session_id: str, resource_id: str) -> Resource | None:
        r = self.by_id.get(resource_id)
        return r if r is not None and r.kind == kind and r.session.id == session_id and not r.closed else None

    def add(self, resource: Resource) -> None:
        """Track ``resource``: its state changes and liveness end it, never its session
        (unless it owns the session)."""
        self.by_id[resource.id] = resource
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())
        if resource.owns_session:  # the session's own peer: sessions.py watches it
            return
        pc = resource.pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and not resource.connected:
                resource.connected = True
                resource.last_heard = time.monotonic()
                resource.watch_rtcp()
            elif pc.connectionState in ("failed", "closed"):
                await self.close(resource, "ice_failed" if pc.connectionState == "failed" else "peer_closed")

    async def answer(self, resource: Resource, sdp: str, decline_video: bool = False) -> str:
        """Apply the peer's offer ``sdp`` to ``resource.pc`` and return the answer SDP.

        ``decline_video``: answer the offer's video as inactive (never decoded).
        Raises HTTPError 400 (an offer aiortc refuses; the resource is closed) or 404
        (its session closed meanwhile).
        """
        pc = resource.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if decline_video:
                for transceiver in pc.getTransceivers():
                    if transceiver.kind == "video":
                        transceiver.direction = "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # what check_offer cannot see
            await self.close(resource, "bad_offer")
            raise HTTPError(400, f"bad offer: {str(e)[:200]}") from e
        if resource.closed:  # its session closed while we answered
            raise HTTPError(404, "the session closed")
        return pc.localDescription.sdp

    async def close(self, resource: Resource, reason: str) -> None:
        """End ``resource`` (idempotent): its peer connection closes, its tracks are
        detached, its ``on_close`` hooks run; its session stays unless it owns it."""
        if resource.closed:
            return
        resource.closed = True
        self.by_id.pop(resource.id, None)
        log.info("%s %s of session %s closed: %s", resource.kind, resource.id[:8], resource.session.id[:8], reason)
        if resource.owns_session:
            await self.registry.close(resource.session, f"{resource.kind}_{reason}")
            return
        for hook in resource.on_close:  # each in its own try: a failing hook never keeps the peer open
            try:
                await hook()
            except Exception:
                log.exception("%s %s: error in a close hook", resource.kind, resource.id[:8])
        try:
            await resource.pc.close()
        except Exception:
            log.exception("%s %s: error while closing", resource.kind, resource.id[:8])
        finally:
            for sender in resource.pc.getSenders():  # let reference counting free the tracks (see sessions.py)
                sender.replaceTrack(None)
                vars(sender).pop("_handle_rtcp_packet", None)
            for receiver in resource.pc.getReceivers():
                vars(receiver).pop("_handle_rtcp_packet", None)

    async def close_all(self, reason: str = "shutdown") -> None:
        await asyncio.gather(*(self.close(r, reason) for r in list(self.by_id.values())))
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _watch(self) -> None:
        a = self.args
        while self.by_id:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for r in list(self.by_id.values()):
                if r.session.closed or (r.owns_session and r.session.id not in self.registry.sessions):
                    await self.close(r, "session_closed")
                elif r.owns_session:  # the session's own peer: sessions.py times it out, not us
                    continue
                elif not r.connected and now - r.created > a.connect_timeout:
                    await self.close(r, "connect_timeout")
                elif r.connected and a.peer_timeout > 0 and now - r.last_heard > a.peer_timeout:
                    await self.close(r, "peer_silent")


class SessionLocks:
    """One ``asyncio.Lock`` per session id, made on demand and dropped when unused, so
    that parallel requests for one session (``/push``, ``/janus``) run one at a time::

        async with locks.hold(session.id):
            ...
    """

    def __init__(self) -> None:
        self._locks: dict[str, list] = {}  # session id -> [lock, holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(key, None)

    def __len__(self) -> int:
        return len(self._locks)


class PerSession(Generic[E]):
    """At most one outgoing publication per session (``whip.Pushes``: a WHIP or RTMP
    push; ``janus.JanusFanout``: a Janus publication), by session id.

    Starts and stops of one session run one at a time (:attr:`locks`, a
    :class:`SessionLocks`; a new start replaces the session's entry); a watchdog, every
    ``WATCH_INTERVAL_S``, stops the entries of closed sessions and those :meth:`ended`
    says are over. An entry has ``session`` and an idempotent ``async stop()`` that never
    raises; what it speaks, and how its failures are reported, is its module's.
    """

    def __init__(self) -> None:
        self.by_session: dict[str, E] = {}
        self.locks = SessionLocks()
        self._watchdog: asyncio.Task | None = None

    async def replace(self, session: "Session", make: Callable[[], E], begin: Callable[[E], Awaitable[Any]]) -> E:
        """Under the session's lock: stop its entry, hold ``make()`` as the new one and
        await ``begin(entry)``; the watchdog then watches it.

        Raises:
            what ``make`` or ``begin`` raise; after ``begin`` raised, the entry is
            stopped and dropped first.
        """
        async with self.locks.hold(session.id):
            await self.stop(session.id)
            entry = make()
            self.by_session[session.id] = entry
            try:
                await begin(entry)
            except Exception:
                await self._forget(session.id, entry)
                raise
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.ensure_future(self._watch())
            return entry

    async def _forget(self, session_id: str, entry: E) -> None:
        """Stop ``entry`` and drop it from :attr:`by_session` if it is still the session's."""
        if self.by_session.get(session_id) is entry:
            del self.by_session[session_id]
        await entry.stop()  # type: ignore[attr-defined]

    async def stop(self, session_id: str) -> bool:
        """Stop the session's entry; False when it had none."""
        entry = self.by_session.pop(session_id, None)
        if entry is None:
            return False
        await entry.stop()  # type: ignore[attr-defined]
        return True

    async def stop_in_turn(self, session_id: str) -> bool:
        """:meth:`stop` once a start of the session under way is done (``{"stop": true}``
        requests); False when it had no entry."""
        async with self.locks.hold(session_id):
            return await self.stop(session_id)

    async def stop_all(self, app: web.Application | None = None) -> None:
        """Stop every entry (an ``on_shutdown`` handler)."""
        await asyncio.gather(*(self.stop(sid) for sid in list(self.by_session)))
        if self._watchdog is not None:
            self._watchdog.cancel()

    def ended(self, entry: E) -> bool:
        """Whether ``entry`` of an open session is over (the watchdog then stops it); a
        subclass may report why on the session's bus. Here: never."""
        return False

    async def _watch(self) -> None:
        while self.by_session:
            await asyncio.sleep(WATCH_INTERVAL_S)
            over = [(sid, e) for sid, e in list(self.by_session.items())
                    if e.session.closed or self.ended(e)]  # type: ignore[attr-defined]
            await asyncio.gather(*(self._forget(sid, e) for sid, e in over))  # each may wait on a server: together


RESOURCES = web.AppKey("wish_resources", Resources)


def resources(app: web.Application, server: Any) -> Resources:
    """The app's :class:`Resources` (made, with its DELETE/PATCH/OPTIONS routes for
    ``kind``, on first use by whep.setup / whip.setup)."""
    if RESOURCES not in app:
        app[RESOURCES] = Resources(server.registry, server.args)

        async def shutdown(app: web.Application) -> None:
            await app[RESOURCES].close_all()

        app.on_shutdown.insert(0, shutdown)  # before the sessions close
    return app[RESOURCES]


def add_resource_routes(app: web.Application, server: Any, kind: str) -> None:
    """``DELETE``, ``PATCH`` and ``OPTIONS`` on ``/<kind>/{sessionid}/{resource}``,
    and ``OPTIONS`` on the endpoints ``/<kind>`` and ``/<kind>/{sessionid}``."""
    res = resources(app, server)

    def session_of(request: web.Request) -> "Session":
        return server.session({"sessionid": request.match_info["sessionid"]}, request)

    async def delete(request: web.Request) -> web.Response:
        session = session_of(request)
        r = res.get(kind, session.id, request.match_info["resource"])
        if r is None:
            raise HTTPError(404, f"no {kind.upper()} resource {request.match_info['resource'][:40]!r} on this session")
        await res.close(r, "deleted")
        return web.Response(status=200, text="")

    async def patch(request: web.Request) -> web.Response:
        return web.json_response(
            {"code": -1, "msg": "this endpoint supports neither trickle ICE nor ICE restarts: send every candidate "
                                "in the offer (non-trickle); a new session needs a new POST"},
            status=405, headers={"Allow": RESOURCE_METHODS})

    def options(methods: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def answer(request: web.Request) -> web.Response:
            headers = {"Allow": methods, "Access-Control-Allow-Methods": methods,
                       "Access-Control-Allow-Headers": "Authorization, Content-Type",
                       "Access-Control-Expose-Headers": "Location"}
            if "POST" in methods:
                headers["Accept-Post"] = SDP_TYPE
            return web.Response(status=204, headers=headers)

        return answer

    if kind == "whep":  # POST /whep starts a session
        app.router.add_route("OPTIONS", f"/{kind}", options(ENDPOINT_METHODS))
    app.router.add_route("OPTIONS", f"/{kind}/{{sessionid}}", options(ENDPOINT_METHODS))
    app.router.add_delete(f"/{kind}/{{sessionid}}/{{resource}}", delete)
    app.router.add_patch(f"/{kind}/{{sessionid}}/{{resource}}", patch)
    app.router.add_route("OPTIONS", f"/{kind}/{{sessionid}}/{{resource}}", options(RESOURCE_METHODS))
