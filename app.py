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
- ``GET /metrics`` Prometheus text; ``GET /status`` JSON; ``GET /`` the web page.

Run ``python app.py --help`` for options.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription

import avatar as avatar_mod
import events
import ingest
from audio import AudioDecodeError, decode_audio
from baseasr import SpeechQueueFull
from basereal import BaseReal, TextQueueFull
from clock import SAMPLE_RATE
from config import parse_args, session_options
from events import EventBus, attach_data_channel
from metrics import Metrics
from webrtc import AvatarAudioTrack, AvatarVideoTrack, use_loopback_ice

log = logging.getLogger("app")

WEB_DIR = Path(__file__).resolve().parent / "web"
SESSION_ID_BYTES = 16  # 128-bit, unguessable (secrets.token_hex)


class HTTPError(Exception):
    """A client error answered as ``{"code": -1, "msg": msg}`` with ``status``."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def ok(data: Any = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"code": 0, "msg": "ok", **extra}
    if data is not None:
        body["data"] = data
    return web.json_response(body)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except HTTPError as e:
        return web.json_response({"code": -1, "msg": e.msg}, status=e.status)


def select_model(args) -> tuple[str, str]:
    """Pick the lip-sync model: returns (name, reason)."""
    if args.model == "default":
        return "default", "requested with --model default"
    if args.model == "musetalk":
        return "musetalk", "requested with --model musetalk"
    if not args.models_dir.is_dir():
        return "default", f"no MuseTalk weights folder at {args.models_dir.resolve()}"
    try:
        import torch

        from musetalk.models import find_weights

        find_weights(args.models_dir, args.musetalk_version)
    except FileNotFoundError as e:
        return "default", f"MuseTalk weights incomplete: {str(e).splitlines()[0]}"
    if not torch.cuda.is_available():
        return "default", "no CUDA device (MuseTalk on CPU is far below real time; force it with --model musetalk)"
    return "musetalk", f"weights at {args.models_dir} and CUDA device {torch.cuda.get_device_name(0)}"


class Session:
    """A peer connection, its worker and its event bus."""

    def __init__(self, session_id: str, pc: RTCPeerConnection, worker: BaseReal, bus: EventBus) -> None:
        self.id = session_id
        self.pc = pc
        self.worker = worker
        self.bus = bus
        self.closed = False


class AvatarServer:
    """Owns the sessions, the shared avatar, model factory and TTS engine."""

    def __init__(self, args) -> None:
        self.args = args
        self.metrics = Metrics()
        self.sessions: dict[str, Session] = {}
        self.model_name, reason = select_model(args)
        log.info("model: %s (%s)", self.model_name, reason)
        self.avatar = self._load_avatar()
        self.options = session_options(args)
        self._tts = None
        self._tts_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._model_factory = self._build_model_factory()

    # -- set-up -------------------------------------------------------------------
    def _load_avatar(self):
        a = self.args
        if a.avatar_id == avatar_mod.DEFAULT_AVATAR_ID:
            return avatar_mod.ensure_default_avatar(a.avatars_dir)
        return avatar_mod.load_avatar(a.avatar_id, a.avatars_dir)

    def _build_model_factory(self):
        a = self.args
        if self.model_name == "musetalk":
            from musereal import musetalk_model_factory

            return musetalk_model_factory(a, self.avatar)
        from visememodel import VisemeWarpModel

        return lambda: VisemeWarpModel(self.avatar, lookahead_ms=a.r * 20, lookbehind_ms=a.l * 20)

    async def tts(self):
        """The shared TTS engine, loaded once off the event loop.

        None with ``--tts none`` or when no engine loads (text input then answers 400).
        """
        if self.args.tts == "none":
            return None
        if self._tts_task is None:
            self._tts_task = asyncio.ensure_future(self._load_tts())
        return await asyncio.shield(self._tts_task)

    async def _load_tts(self):
        from tts import make_tts

        try:
            return await asyncio.get_running_loop().run_in_executor(None, make_tts, self.args.tts)
        except Exception:
            log.exception("no TTS engine could be loaded: /human is unavailable")
            return None

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions -------------------------------------------------------------------
    def session(self, body: dict[str, Any]) -> Session:
        sid = body.get("sessionid")
        if sid is None or sid == "":
            raise HTTPError(400, "missing 'sessionid'")
        s = self.sessions.get(str(sid))
        if s is None or s.closed:
            raise HTTPError(404, f"unknown session '{str(sid)[:40]}'")
        return s

    def session_of_query(self, request: web.Request) -> Session:
        """The session named by ``?sessionid=`` (GET routes). Raises HTTPError 400/404."""
        return self.session(dict(request.query))

    async def close_session(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        self.metrics.sessions.set(len(self.sessions))
        log.info("session %s closed (%d open)", session.id[:8], len(self.sessions))
        await asyncio.get_running_loop().run_in_executor(None, session.worker.stop)
        session.bus.close()
        await session.pc.close()
        self.metrics.remove(session.id)

    async def _close_if_not_connected(self, session: Session) -> None:
        await asyncio.sleep(self.args.connect_timeout)
        if not session.closed and session.pc.connectionState != "connected":
            log.warning("session %s never connected; closing", session.id[:8])
            await self.close_session(session)

    # -- handlers -------------------------------------------------------------------
    async def offer(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        sdp, kind = body.get("sdp"), body.get("type")
        if kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            raise HTTPError(400, "expected {'sdp': <offer SDP string>, 'type': 'offer'}")
        mic = body.get("mic")
        if mic not in (None, "off", "lipsync"):
            raise HTTPError(400, f"'mic' must be 'lipsync' or 'off', got {str(mic)[:20]!r}")
        if len(self.sessions) >= self.args.max_session:
            raise HTTPError(503, f"server full: {len(self.sessions)}/{self.args.max_session} sessions")
        sid = secrets.token_hex(SESSION_ID_BYTES)
        tts = await self.tts()
        bus = EventBus()
        worker = BaseReal(sid, self._model_factory(), self.avatar, self.options, self.metrics.session(sid), tts, bus.publish)
        pc = RTCPeerConnection()
        session = Session(sid, pc, worker, bus)
        self.sessions[sid] = session
        self.metrics.sessions.set(len(self.sessions))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: %s", sid[:8], pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_session(session)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label == "events":
                attach_data_channel(channel, bus)

        @pc.on("track")
        def on_track(track) -> None:
            # The microphone as live speech; any other incoming track is drained unused.
            use = track.kind == "audio" and mic == "lipsync"
            self._background(ingest.MicrophoneIngest(worker, track).run() if use else drain(track))

        try:
            if mic == "lipsync":  # answer the page's sendrecv audio transceiver
                pc.addTransceiver(AvatarAudioTrack(worker), direction="sendrecv")
            else:
                pc.addTrack(AvatarAudioTrack(worker))
            pc.addTrack(AvatarVideoTrack(worker))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # malformed SDP and friends
            await self.close_session(session)
            raise HTTPError(400, f"bad offer: {e}") from e
        worker.start()
        self._background(self._close_if_not_connected(session))
        log.info("session %s opened (%d open)", sid[:8], len(self.sessions))
        return web.json_response(
            {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "sessionid": sid, "code": 0}
        )

    async def human(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        session = self.session(body)
        text, kind = body.get("text"), body.get("type", "echo")
        if kind != "echo":
            raise HTTPError(400, f"type '{kind}' is not supported (no LLM is configured); use 'echo'")
        if not isinstance(text, str) or not text.strip():
            raise HTTPError(400, "'text' must be a non-empty string")
        if len(text) > self.args.max_text_chars:
            raise HTTPError(413, f"text of {len(text)} characters exceeds the limit of {self.args.max_text_chars}")
        if body.get("interrupt"):
            session.worker.interrupt()
        try:
            utterance = session.worker.say(text)
        except TextQueueFull as e:
            raise HTTPError(429, str(e)) from e
        except RuntimeError as e:
            raise HTTPError(400, str(e)) from e
        return ok(utterance=utterance)

    async def humanaudio(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise HTTPError(400, "expected multipart/form-data with fields 'sessionid' and 'file'")
        limit = int(self.args.max_upload_mb * 1024 * 1024)
        fields: dict[str, Any] = {}
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.name == "file":
                    data = bytearray()
                    while chunk := await part.read_chunk(1 << 16):
                        data.extend(chunk)
                        if len(data) > limit:
                            raise HTTPError(413, f"upload exceeds {self.args.max_upload_mb:g} MB")
                    fields["file"] = bytes(data)
                elif part.name in ("sessionid", "interrupt"):
                    fields[part.name] = (await part.text())[:200]
        except (ValueError, AssertionError) as e:
            raise HTTPError(400, f"malformed multipart body: {e}") from e
        session = self.session(fields)
        if not fields.get("file"):
            raise HTTPError(400, "missing or empty 'file' field")
        loop = asyncio.get_running_loop()
        try:
            pcm = await loop.run_in_executor(
                None, decode_audio, fields["file"], self.args.max_audio_seconds
            )
        except AudioDecodeError as e:
            raise HTTPError(400, f"cannot decode audio: {e}") from e
        if fields.get("interrupt", "").lower() in ("1", "true", "yes"):
            session.worker.interrupt()
        utterance = session.worker.open_utterance("audio")
        try:
            session.worker.put_audio(pcm, utterance=utterance)
        except (SpeechQueueFull, ValueError) as e:
            session.worker.end_utterance(utterance)
            raise HTTPError(429 if isinstance(e, SpeechQueueFull) else 413, str(e)) from e
        return ok(duration_s=round(len(pcm) / SAMPLE_RATE, 3), utterance=utterance)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        return await ingest.websocket(request, self.session_of_query(request))

    async def interrupt_talk(self, request: web.Request) -> web.Response:
        session = self.session(await read_json(request))
        session.worker.interrupt()
        return ok()

    async def is_speaking(self, request: web.Request) -> web.Response:
        session = self.session(await read_json(request))
        return ok(data=session.worker.is_speaking())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model": self.model_name,
                "avatar_id": self.args.avatar_id,
                "latency_mode": self.args.latency_mode,
                "max_session": self.args.max_session,
                "sessions": {sid[:8]: s.worker.status() for sid, s in self.sessions.items()},
            }
        )

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def on_startup(self, app: web.Application) -> None:
        # aiortc encodes every audio and video frame on the loop's default executor;
        # CPython sizes it by CPU count (6 threads on 2 cores), so a few sessions'
        # encoders queue behind each other and frames go out late. Give each track
        # of each session a thread, plus some for uploads and teardown.
        workers = 2 * self.args.max_session + 4
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="media"))
        self._background(self.tts())  # load the voice now, not on the first /offer

    async def on_shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(self.close_session(s) for s in list(self.sessions.values())))


async def drain(track) -> None:
    """Receive and discard an incoming track nobody uses (its frames would pile up)."""
    from aiortc.contrib.media import MediaBlackhole

    sink = MediaBlackhole()
    sink.addTrack(track)
    await sink.start()


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body. Raises HTTPError(400) when malformed."""
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from e
    if not isinstance(body, dict):
        raise HTTPError(400, "JSON body must be an object")
    return body


def build_app(args) -> web.Application:
    """The aiohttp application for ``args`` (see config.parse_args)."""
    server = AvatarServer(args)
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app["server"] = server
    app.router.add_post("/offer", server.offer)
    app.router.add_post("/human", server.human)
    app.router.add_post("/humanaudio", server.humanaudio)
    app.router.add_post("/interrupt_talk", server.interrupt_talk)
    app.router.add_post("/is_speaking", server.is_speaking)
    app.router.add_get("/ws", server.websocket)
    events.setup(app, server.session_of_query)
    app.router.add_get("/status", server.status)
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_loopback(args.listen):
        use_loopback_ice()
    try:
        app = build_app(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    log.info("listening on http://%s:%d", args.listen, args.port)
    web.run_app(app, host=args.listen, port=args.port, print=None)


if __name__ == "__main__":
    main()
