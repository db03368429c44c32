"""Access control and connection limits.

- ``--api_key`` (or ``API_KEY`` in the environment): every route but the page and
  its static files needs ``Authorization: Bearer <key>`` (``OPTIONS`` requests do
  not: they only describe a route, and browsers send preflights without credentials). Each ``/offer`` answer
  carries a per-session ``token``; per-session routes (``/human``, ``/humanaudio``,
  ``/interrupt_talk``, ``/is_speaking``, ``/ws``, ``/events``, ``/sse``) accept that
  session's token or the key, so a leaked session id alone controls nothing. Where a
  client cannot set headers (WebSocket, EventSource), ``?token=`` carries it.
  Comparisons are constant-time (``hmac.compare_digest``). Without a key nothing is
  checked (LiveTalking's behaviour; the server warns when it listens beyond loopback).
- ``--cors_origin``: origins allowed to call the API from another page (default
  none: a request whose ``Origin`` is not the server's own is refused with 403).
- Slow clients: a connection that has not sent a whole request head within
  ``--request_timeout`` s is closed (aiohttp's keep-alive timer, which also runs
  before the first request), bodies are read within the same time (``api.py``),
  and each client address may hold at most ``--max_connections_per_address``
  connections at once (more are closed on arrival).
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from typing import Any, Callable
from urllib.parse import urlsplit

from aiohttp import web

from api import error_response

log = logging.getLogger(__name__)

SESSION_ROUTES = frozenset({"/human", "/humanaudio", "/interrupt_talk", "/is_speaking", "/ws", "/events", "/sse",
                            "/stats", "/record"})
# /whep/<sessionid>[/<resource>], /stream/<sessionid>.mp4, /record/<sessionid>: the session's token, or the key
SESSION_PREFIXES = ("/whep/", "/whip/", "/stream/", "/record/")
PUBLIC_ROUTES = frozenset({"/"})
PUBLIC_PREFIXES = ("/web/",)


def presented_credential(request: web.Request) -> str | None:
    """The bearer credential of a request: ``Authorization: Bearer x`` or ``?token=x``."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token")


def same(secret: str | None, presented: str | None) -> bool:
    """Constant-time equality of two credentials (False if either is missing)."""
    if not secret or not presented:
        return False
    return hmac.compare_digest(secret.encode(), presented.encode())


class AccessControl:
    """The API key, per-session tokens and CORS.

    Args:
        api_key: the key, or None/"" for no access control.
        cors_origins: origins (``scheme://host[:port]``) allowed to call the API cross-origin.
    """

    def __init__(self, api_key: str | None, cors_origins: list[str]) -> None:
        self.api_key = api_key or None
        self.cors_origins = {o.rstrip("/") for o in cors_origins if o}

    def authorize_session(self, request: web.Request, session: Any) -> bool:
        """May ``request`` act on ``session``: no key configured, its token, or the key."""
        if self.api_key is None:
            return True
        presented = presented_credential(request)
        return same(session.token, presented) or same(self.api_key, presented)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable):
        origin = request.headers.get("Origin")
        allowed_cross = False
        if origin is not None and not _same_origin(origin, request):
            if origin.rstrip("/") not in self.cors_origins:
                return error_response(403, f"cross-origin requests from {origin[:80]!r} are not allowed (see --cors_origin)")
            allowed_cross = True
            if request.method == "OPTIONS":  # CORS preflight
                return web.Response(status=204, headers=_cors_headers(origin, preflight=True))
        if (self.api_key is not None and request.method != "OPTIONS" and not self._public(request.path)
                and request.path not in SESSION_ROUTES and not request.path.startswith(SESSION_PREFIXES)):
            if not same(self.api_key, presented_credential(request)):
                return error_response(401, "this server needs 'Authorization: Bearer <api key>'")
        response = await handler(request)
        if allowed_cross and not response.prepared:
            response.headers.update(_cors_headers(origin))
        return response

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_ROUTES or path.startswith(PUBLIC_PREFIXES)


def _same_origin(origin: str, request: web.Request) -> bool:
    """``origin`` is the server's own (False for one that is not a URL: a cross-origin 403)."""
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. "http://[": refused as cross-origin, never a 500
        return False
    return parts.netloc != "" and parts.netloc == request.host


def _cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
               "Access-Control-Expose-Headers": "Location, X-Session-Id, X-Session-Token"}  # WHEP/WHIP answers
    if preflight:
        headers.update({
            "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        })
    return headers


def limit_connections_per_address(server: web.Server, max_per_address: int) -> Counter:
    """Close connections beyond ``max_per_address`` open ones from one client address.

    Wraps the aiohttp ``Server``'s connection bookkeeping (``connection_made`` /
    ``connection_lost``, called for every accepted socket). Returns the live counts.
    """
    counts: Counter = Counter()
    made, lost = server.connection_made, server.connection_lost
    addresses: dict[int, str] = {}

    def connection_made(handler, transport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, (tuple, list)) and peer else "?"
        addresses[id(handler)] = address
        counts[address] += 1
        made(handler, transport)
        if counts[address] > max_per_address:
            log.warning("closing a connection from %s: %d open (limit %d)", address, counts[address], max_per_address)
            transport.close()

    def connection_lost(handler, exc) -> None:
        address = addresses.pop(id(handler), None)
        if address is not None:
            counts[address] -= 1
            if counts[address] <= 0:
                del counts[address]
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
    return counts
