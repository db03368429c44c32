"""Signaling and control server: one session worker per WebRTC peer.

HTTP API (LiveTalking-compatible; JSON bodies, answers ``{"code": 0, "msg": "ok"}``
or ``{"code": -1, "msg": "<error>"}`` with an HTTP 4xx status):

- ``POST /offer`` ``{sdp, type, mic?: "lipsync"}`` -> ``{sdp, type: "answer", sessionid}``
- ``POST /human`` ``{sessionid, text, type: "echo", interrupt?}`` -> ``{utterance}``
- ``POST /humanaudio`` multipart ``sessionid``, ``file`` (any audio PyAV decodes) -> ``{utterance}``
- ``POST /interrupt_talk`` ``{sessionid}``
- ``POST /is_speaking`` ``{sessionid}`` -> ``{code: 0, data: bool}``
- ``GET /ws?sessionid=`` live audio in, events out (``ingest.py``)
- ``GET /events?sessionid=`` playback events as SSE; ``GET /sse`` LiveTalking's shape (``events.py``)
- ``GET /stream/<sessionid>.mp4`` live fragmented MP4 (``fmp4.py``); ``POST /record``,
  ``GET /record/<sessionid>`` recordings (``record.py``)
- ``GET /metrics`` Prometheus text; ``GET /status`` JSON; ``GET /`` the web page.

Run ``python app.py --help`` for options.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys

from aiohttp import web

import events
import fmp4
import janus
import record
import whep
import whip
from api import error_middleware
from config import parse_args
from security import limit_connections_per_address
from server import WEB_DIR, AvatarServer
from webrtc import use_loopback_ice

log = logging.getLogger("app")

SERVER = web.AppKey("server", AvatarServer)  # the app's AvatarServer


def build_app(args) -> web.Application:
    """The aiohttp application for ``args`` (see config.parse_args)."""
    server = AvatarServer(args)
    app = web.Application(middlewares=[error_middleware, server.access.middleware], client_max_size=1024 * 1024)
    app[SERVER] = server
    app.router.add_post("/offer", server.offer)
    app.router.add_post("/human", server.human)
    app.router.add_post("/humanaudio", server.humanaudio)
    app.router.add_post("/interrupt_talk", server.interrupt_talk)
    app.router.add_post("/is_speaking", server.is_speaking)
    app.router.add_get("/ws", server.websocket)
    events.setup(app, server.session_of_query)
    whep.setup(app, server)  # WHEP viewers: POST /whep[/<sessionid>]
    whip.setup(app, server)  # WHIP ingest (POST /whip/<sessionid>) and push (POST /push)
    janus.setup(app, server)  # Janus VideoRoom fan-out: POST /janus
    fmp4.setup(app, server)  # live fragmented MP4: GET /stream/<sessionid>.mp4
    record.setup(app, server)  # recordings: POST /record, GET /record/<sessionid>
    app.router.add_get("/status", server.status)
    app.router.add_get("/config", server.config)
    app.router.add_get("/avatars", server.avatars)
    app.router.add_get("/voices", server.voices)
    app.router.add_get("/stats", server.stats)
    app.router.add_get("/metrics", server.metrics_handler)
    app.router.add_get("/", server.index)
    app.router.add_static("/web/", WEB_DIR)
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(app: web.Application, args) -> None:
    """Listen until SIGINT/SIGTERM, with the slow-client and per-address limits."""
    runner = web.AppRunner(app, keepalive_timeout=args.request_timeout)
    await runner.setup()
    limit_connections_per_address(runner.server, args.max_connections_per_address)
    site = web.TCPSite(runner, args.listen, args.port)
    await site.start()
    log.info("listening on http://%s:%d", args.listen, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.api_key = args.api_key or os.environ.get("API_KEY") or None
    if is_loopback(args.listen):
        use_loopback_ice()
    elif args.api_key is None:
        log.warning("listening on %s without --api_key: anyone who can reach this port can open sessions "
                    "and make the avatar say anything", args.listen)
    try:
        if args.workers > 0 or args.ray_address:  # sessions in Ray actors behind this front
            from front import build_front_app

            app = build_front_app(args)
        else:
            app = build_app(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    asyncio.run(serve(app, args))


if __name__ == "__main__":
    main()
