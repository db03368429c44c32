"""WHEP (WebRTC-HTTP Egress Protocol, draft-ietf-wish-whep-03): any WHEP player watches a session.

Routes (``wish.py`` has the shared rules: bodies, DELETE, PATCH, OPTIONS, liveness):

- ``POST /whep/<sessionid>``, ``Content-Type: application/sdp``, the player's
  recvonly offer -> ``201 Created``, the SDP answer, ``Location:
  /whep/<sessionid>/<viewer>``. The viewer gets its own pair of tracks
  (``webrtc.JoinPoint``): the session's media from the next slot on, with the same
  pts, the same A/V pairing and the same frames as the session's own peer and
  every other viewer; each viewer costs its own encode (``--video_codec`` is
  preferred, as for the session's own peer, when the player offers it). At most
  ``--max_viewers`` viewers per session (503 beyond). With ``--api_key``: the
  session's token or the key as ``Authorization: Bearer``.
- ``POST /whep`` (no id): a new session whose peer is this player, so a plain
  WHEP player gets a talking avatar (the answer's ``X-Session-Id`` and
  ``X-Session-Token`` headers let the caller drive it: ``/human``, ``/ws``...).
  Its ``DELETE`` ends the session.
- ``DELETE`` on the ``Location`` ends the viewer (200); the session goes on.
  ``PATCH`` -> 405 (no trickle ICE, no ICE restart; ``Allow: DELETE, OPTIONS``).

Errors (JSON ``{"code": -1, "msg"}``): 415 not ``application/sdp``; 404 unknown
session or viewer; 401 missing/wrong token; 400 a bad offer; 413 a too large one;
503 the session's viewers, or the server, are full; 429 too many connecting
sessions from one address.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection

import wish
from api import HTTPError
from webrtc import AvatarAudioTrack, AvatarVideoTrack, JoinPoint, prefer_video_codec

log = logging.getLogger(__name__)

KIND = "whep"


class WhepEndpoint:
    """The WHEP routes of one server (``server``: ``server.AvatarServer``)."""

    def __init__(self, server: Any, resources: wish.Resources) -> None:
        self.server = server
        self.resources = resources

    async def new_session(self, request: web.Request) -> web.Response:
        """``POST /whep``: the offer opens a new session; its peer is this player."""
        sdp = await wish.read_sdp(request, self.server.args.request_timeout)
        # open_session(trickle=True) checks the offer as wish.check_wish_offer(send=False) does (the same 400)
        session = await self.server.open_session(sdp, request.remote or "?", trickle=True)
        resource = wish.Resource(KIND, session, session.pc, owns_session=True)
        self.resources.add(resource)
        return wish.created(session.pc.localDescription.sdp, resource.location,
                            {"X-Session-Id": session.id, "X-Session-Token": session.token,
                             "Access-Control-Expose-Headers": "Location, X-Session-Id, X-Session-Token"})

    async def view(self, request: web.Request) -> web.Response:
        """``POST /whep/<sessionid>``: a new viewer of a running session."""
        session = self.server.session({"sessionid": request.match_info["sessionid"]}, request)
        sdp = await wish.read_sdp(request, self.server.args.request_timeout)
        wish.check_wish_offer(sdp, send=False)
        limit = self.server.args.max_viewers
        if self.resources.count(session, KIND) >= limit:
            raise HTTPError(503, f"this session already has {limit} WHEP viewers (--max_viewers)")
        ice = self.server.ice_servers
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice) if ice else None)
        resource = wish.Resource(KIND, session, pc)
        self.resources.add(resource)  # counted from here on: parallel POSTs cannot pass --max_viewers
        join = JoinPoint()
        try:
            pc.addTrack(AvatarAudioTrack(session.worker, join))
            video_sender = pc.addTrack(AvatarVideoTrack(session.worker, join))
            prefer_video_codec(pc, video_sender, getattr(self.server.args, "video_codec", "auto"), sdp)  # --video_codec, if offered
        except Exception as e:  # a track or codec aiortc refuses for this offer
            await self.resources.close(resource, "bad_offer")
            raise HTTPError(400, f"bad offer: {str(e)[:200]}") from e
        answer = await self.resources.answer(resource, sdp)
        log.info("session %s: WHEP viewer %s from %s (%d viewers)", session.id[:8], resource.id[:8],
                 request.remote, self.resources.count(session, KIND))
        return wish.created(answer, resource.location)


def setup(app: web.Application, server: Any) -> None:
    """Register the WHEP routes (``POST /whep``, ``/whep/{sessionid}`` and the resource routes)."""
    endpoint = WhepEndpoint(server, wish.resources(app, server))
    app.router.add_post("/whep", endpoint.new_session)
    app.router.add_post("/whep/{sessionid}", endpoint.view)
    wish.add_resource_routes(app, server, KIND)
