"""WHIP (WebRTC-HTTP Ingestion Protocol, RFC 9725), both ways.

**Ingest** (this server as the WHIP endpoint): ``POST /whip/<sessionid>``,
``Content-Type: application/sdp``, a publisher's offer (OBS 30+, a browser,
GStreamer's whipsink, another of these servers) -> ``201 Created``, the SDP answer,
``Location: /whip/<sessionid>/<publisher>``. The publisher's audio track becomes the
session's live speech (``ingest.MicrophoneIngest``: talk spurts, one utterance
each); its video, if any, is declined (``inactive`` in the answer: never received
nor decoded). One publisher per session at a time (409 while one is connected);
the session's own peer must have connected (409 before) and must not feed the
microphone itself (409 for a session opened with ``"mic": "lipsync"`` or
``"converse"``). ``DELETE`` on the ``Location`` ends it; ``PATCH`` -> 405. Errors as
for WHEP (``whep.py``): 415, 404, 401, 400, 413. With ``--api_key``: the session's
token (or the key) as ``Authorization: Bearer``.

**Push** (this server as a WHIP client): the session's audio and video published
to any WHIP endpoint (an SFU, a media server, another of these servers):

- ``POST /push {"sessionid", "url", "token"?}`` starts a push (``token``: the
  endpoint's bearer token) and answers ``{"code": 0, "resource": <its URL>}``
  once the endpoint answered ``201``; ``POST /push {"sessionid", "stop": true}``
  stops it (``DELETE`` of the resource). Only ``http(s)`` URLs (400 otherwise).
- ``--whip_url URL`` (``--whip_token``): every session is pushed there once its
  peer connects.

The offer carries every candidate (non-trickle: aiortc gathers before it
answers); ``307``/``308`` redirects are followed (at most ``MAX_REDIRECTS``, with
the same body; the token only while the URL keeps the endpoint's origin); the
``Location`` is resolved against the URL that answered and ``DELETE``d when the
push stops or the session ends. The answer must be ``201`` with ``Content-Type:
application/sdp`` of at most ``webrtc.MAX_SDP_BYTES``. Every request has a
``PUSH_TIMEOUT_S`` limit. A failure (unreachable, timeout, a non-201 answer, ICE
failing later) is published as an ``error`` event on the session's bus (``{"type":
"error", "msg", "source": "whip_push"}``) and, for ``/push``, answered ``502`` with
the same message (the status, never the endpoint's body: that goes to the log only);
the session itself goes on. Parallel ``/push`` calls for one session run one after
the other (the later one replaces the earlier push).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole

import ingest
import wish
from api import MAX_URL_CHARS, HTTPError, check_url, ok, read_json
from webrtc import AvatarAudioTrack, AvatarVideoTrack, JoinPoint, shorten_receive_buffer

log = logging.getLogger(__name__)

KIND = "whip"
PUSH_TIMEOUT_S = 10.0  # each HTTP request of a push (POST, each redirect, DELETE)
MAX_REDIRECTS = 3  # 307/308 hops followed (RFC 9725 section 4.6)
MIC_MODES = ("lipsync", "converse")  # a session opened with these takes its microphone from its own peer


# -- ingest ---------------------------------------------------------------------------
class WhipEndpoint:
    """``POST /whip/<sessionid>``: a publisher's audio as the session's live speech."""

    def __init__(self, server: Any, resources: wish.Resources) -> None:
        self.server = server
        self.resources = resources

    async def publish(self, request: web.Request) -> web.Response:
        session = self.server.session({"sessionid": request.match_info["sessionid"]}, request, connected=True)
        sdp = await wish.read_sdp(request, self.server.args.request_timeout)
        wish.check_wish_offer(sdp, send=True)
        if getattr(session, "mic", None) in MIC_MODES:
            raise HTTPError(409, f"this session's own peer already feeds its microphone ('mic': {session.mic!r}); "
                                 "open the session without 'mic' to take a WHIP publisher's audio")
        if self.resources.count(session, KIND):
            raise HTTPError(409, "this session already has a WHIP publisher: DELETE its resource first")
        ice = self.server.ice_servers
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice) if ice else None)
        resource = wish.Resource(KIND, session, pc)
        self.resources.add(resource)  # counted from here on: a parallel POST gets the 409 above
        tasks: list[asyncio.Task] = []
        sinks: list[MediaBlackhole] = []

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio" and not tasks:
                shorten_receive_buffer(pc, track)  # live speech, not played out here: 2 packets, not 4
                tasks.append(asyncio.ensure_future(ingest.MicrophoneIngest(session.worker, track).run()))
            elif track.kind == "audio":  # a second audio track: received (the answer accepts it), discarded
                sink = MediaBlackhole()
                sink.addTrack(track)
                sinks.append(sink)
                tasks.append(asyncio.ensure_future(sink.start()))
            # video: declined in the answer (inactive), so nothing arrives to decode

        async def stop_tasks() -> None:
            for t in tasks:
                t.cancel()
            for sink in sinks:
                await sink.stop()

        resource.on_close.append(stop_tasks)
        # the publisher's video is not used: declined, never decoded
        answer = await self.resources.answer(resource, sdp, decline_video=True)
        log.info("session %s: WHIP publisher %s from %s", session.id[:8], resource.id[:8], request.remote)
        return wish.created(answer, resource.location)


# -- push -----------------------------------------------------------------------------
class WhipPushError(Exception):
    """A push that could not start: the endpoint is unreachable, timed out or refused."""


def check_push_url(url: Any) -> str:
    """An ``http(s)`` WHIP endpoint URL (``api.check_url``), or an ``rtmp(s)://`` URL
    (``rtmp.check_rtmp_url``, for ``rtmp.RtmpPush``). Raises HTTPError(400)."""
    import rtmp

    if rtmp.is_rtmp_url(url):
        try:
            return rtmp.check_rtmp_url(url)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
    check_url(url, ("http", "https"), "the WHIP endpoint's http(s):// URL or an rtmp(s):// URL")
    return url


def same_origin(a: str, b: str) -> bool:
    """``a`` and ``b`` have the same scheme, host and port (RFC 6454's origin)."""
    try:
        pa, pb = urlsplit(a), urlsplit(b)
        return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)
    except ValueError:
        return False


class WhipPush:
    """One session's audio and video published to a WHIP endpoint.

    Args:
        session: the ``sessions.Session`` to publish.
        url: the WHIP endpoint (http/https).
        token: its bearer token, or None.
        ice_servers: ``aiortc.RTCIceServer`` list for the peer connection.
    """

    def __init__(self, session: Any, url: str, token: str | None, ice_servers: list | None = None) -> None:
        self.session = session
        self.url = url
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers) if ice_servers else None)
        self.resource: str | None = None  # the Location, absolute
        self.stopped = False

    def _headers(self, url: str, content_type: str | None = None) -> dict[str, str]:
        """The request's headers; the bearer token only goes to the endpoint's own
        origin (a redirect or a ``Location`` elsewhere does not receive it)."""
        headers = {"Content-Type": content_type} if content_type else {}
        if self.token and same_origin(url, self.url):
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def start(self) -> str:
        """Offer, POST, answer. Returns the resource URL.

        Raises:
            WhipPushError: unreachable, a timeout, a non-201 answer, no Location, a bad answer.
        """
        join = JoinPoint()
        self.pc.addTransceiver(AvatarAudioTrack(self.session.worker, join), direction="sendonly")
        self.pc.addTransceiver(AvatarVideoTrack(self.session.worker, join), direction="sendonly")

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState == "failed" and not self.stopped:
                self.report(f"WHIP push to {self.url[:80]}: ICE failed")
                await self.stop()

        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        url = self.url
        timeout = aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for _ in range(MAX_REDIRECTS + 1):
                    async with http.post(url, data=self.pc.localDescription.sdp.encode(),
                                         headers=self._headers(url, wish.SDP_TYPE), allow_redirects=False) as r:
                        if r.status in (307, 308) and r.headers.get("Location"):
                            url = urljoin(url, r.headers["Location"])
                            continue
                        body = await r.content.read(wish.MAX_SDP_BYTES + 1)
                        if r.status != 201:  # the body stays in the log: the endpoint is the caller's choice
                            log.info("session %s: WHIP endpoint %s answered %d: %r", self.session.id[:8],
                                     url[:80], r.status, body[:200])
                            raise WhipPushError(f"WHIP endpoint {url[:80]} answered {r.status} {r.reason or ''}".rstrip())
                        location = r.headers.get("Location")
                        if not location:
                            raise WhipPushError(f"WHIP endpoint {url[:80]} answered 201 without a Location")
                        if r.content_type != wish.SDP_TYPE:
                            raise WhipPushError(f"WHIP endpoint {url[:80]} answered 201 with Content-Type "
                                                f"{r.content_type[:60]!r}, not {wish.SDP_TYPE}")
                        if len(body) > wish.MAX_SDP_BYTES:
                            raise WhipPushError(f"WHIP endpoint {url[:80]} answered more than "
                                                f"{wish.MAX_SDP_BYTES} bytes of SDP")
                        self.resource = urljoin(url, location)
                        answer = body.decode("utf-8", "replace")
                        break
                else:
                    raise WhipPushError(f"more than {MAX_REDIRECTS} redirects from {self.url[:80]}")
        except (aiohttp.ClientError, OSError) as e:
            raise WhipPushError(f"WHIP endpoint {url[:80]} unreachable: {str(e)[:160] or type(e).__name__}") from e
        except TimeoutError as e:
            raise WhipPushError(f"WHIP endpoint {url[:80]} did not answer within {PUSH_TIMEOUT_S:g} s") from e
        except ValueError as e:  # a redirect's Location that is not a URL
            raise WhipPushError(f"WHIP endpoint {url[:80]} sent an unusable Location: {str(e)[:120]}") from e
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        except Exception as e:
            await self.delete()
            raise WhipPushError(f"WHIP endpoint {url[:80]} sent an unusable answer: {str(e)[:160]}") from e
        return self.resource

    def report(self, msg: str) -> None:
        """An ``error`` event on the session's bus."""
        log.warning("session %s: %s", self.session.id[:8], msg)
        self.session.bus.publish({"type": "error", "msg": msg, "source": "whip_push"})

    async def delete(self) -> None:
        """DELETE the resource (once; errors are reported, never raised)."""
        resource, self.resource = self.resource, None
        if resource is None:
            return
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S)) as http:
                async with http.delete(resource, headers=self._headers(resource)) as r:
                    if r.status >= 300:
                        self.report(f"WHIP DELETE {resource[:80]} answered {r.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.report(f"WHIP DELETE {resource[:80]} failed: {str(e)[:160] or type(e).__name__}")

    async def stop(self) -> None:
        """End the push: DELETE the resource, close the peer connection (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        await self.delete()
        await self.pc.close()
        for sender in self.pc.getSenders():
            sender.replaceTrack(None)


class Pushes(wish.PerSession[Any]):
    """The WHIP (and RTMP) pushes of one server, at most one per session (a new one
    replaces it; ``wish.PerSession``: one start or stop of a session at a time, the
    pushes of closed sessions stopped)."""

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.server = server

    async def start(self, session: Any, url: str, token: str | None) -> Any:
        """Start a push of ``session``: WHIP for http(s) URLs, RTMP (FLV, ``rtmp.RtmpPush``)
        for rtmp(s) ones. Raises WhipPushError (also reported on its bus, once)."""
        import rtmp

        def make() -> Any:
            try:
                return rtmp.RtmpPush(session, url) if rtmp.is_rtmp_url(url) else WhipPush(session, url, token,
                                                                                          self.server.ice_servers)
            except ValueError as e:  # a URL that check_push_url let through
                raise WhipPushError(f"bad push URL: {e}") from e

        async def begin(push: Any) -> None:
            try:
                await push.start()
            except Exception as e:
                if isinstance(e, rtmp.RtmpPushError):
                    msg = str(e)  # rtmp.RtmpPush published it already
                else:
                    if isinstance(e, WhipPushError):
                        msg = str(e)
                    else:  # aiortc or aiohttp failing in a way we did not foresee: a 502, not a 500
                        log.exception("session %s: push to %s failed", session.id[:8], url[:80])
                        msg = f"push to {url[:80]} failed: {type(e).__name__}"
                    push.report(msg)
                raise WhipPushError(msg) from e
            if session.closed:  # closed while we waited for the endpoint
                raise WhipPushError("the session closed while the push was starting")

        push = await self.replace(session, make, begin)
        log.info("session %s: pushing to %s", session.id[:8], push.resource)
        return push

    def ended(self, push: Any) -> bool:
        """A push that failed (its ICE gave up, its RTMP connection was lost)."""
        return push.stopped

    # -- routes -------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.Response:
        """``POST /push {sessionid, url, token?}`` / ``{sessionid, stop: true}``."""
        body = await read_json(request, self.server.args.request_timeout)
        session = self.server.session(body, request)
        if body.get("stop"):
            return ok(stopped=await self.stop_in_turn(session.id))
        url = check_push_url(body.get("url"))
        token = body.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > MAX_URL_CHARS):
            raise HTTPError(400, "'token' must be a string")
        if not session.connected:
            raise HTTPError(409, "the session's peer has not connected yet; push once it has")
        try:
            push = await self.start(session, url, token)
        except WhipPushError as e:
            raise HTTPError(502, str(e)) from e
        return ok(resource=push.resource)

    def push_every_session(self, url: str, token: str | None) -> None:
        """``--whip_url``: push each session once its peer connects (wraps the
        registry's ``on_connected``)."""
        registry = self.server.registry
        connected = registry.on_connected

        def on_connected(session: Any) -> None:
            first = not session.connected
            connected(session)
            if first and session.connected and not session.closed:
                self.server._background(self._auto_push(session, url, token))

        registry.on_connected = on_connected

    async def _auto_push(self, session: Any, url: str, token: str | None) -> None:
        try:
            await self.start(session, url, token)
        except WhipPushError:
            pass  # reported on the session's events


def setup(app: web.Application, server: Any) -> None:
    """Register ``POST /whip/{sessionid}`` (ingest, with its resource routes) and
    ``POST /push``; with ``--whip_url``, push every session there."""
    endpoint = WhipEndpoint(server, wish.resources(app, server))
    app.router.add_post("/whip/{sessionid}", endpoint.publish)
    wish.add_resource_routes(app, server, KIND)
    pushes = Pushes(server)
    app.router.add_post("/push", pushes.handle)
    app.on_shutdown.insert(0, pushes.stop_all)
    if getattr(server.args, "whip_url", None):
        try:
            check_push_url(server.args.whip_url)
        except HTTPError as e:
            raise ValueError(f"--whip_url: {e.msg}") from e
        pushes.push_every_session(server.args.whip_url, server.args.whip_token)
