"""The session host: one process's sessions, their workers and the per-session routes.

:class:`AvatarServer` owns the sessions of one process (peer connections, worker
threads, tracks, model), the shared TTS/STT engines and the handlers of the
LiveTalking-compatible HTTP API. ``app.py`` routes requests to it; in workers mode
(issue #10) each worker process runs one of these behind the front.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

import ingest
from api import HTTPError, ok, read_json, read_multipart
from audio import AudioDecodeError, AudioTooLong, decode_audio
from baseasr import SpeechQueueFull
from basereal import BaseReal, TextQueueFull
from catalog import Catalog
from clock import SAMPLE_RATE
from chat import ChatClient
from config import session_options
from converse import ChatAgent, VoiceConversation
from events import EventBus, attach_data_channel
from metrics import Metrics
from security import AccessControl
from sessions import Session, SessionRegistry
from webrtc import AvatarAudioTrack, AvatarVideoTrack, check_offer, parse_ice_servers, prefer_video_codec, shorten_receive_buffer

log = logging.getLogger("server")

WEB_DIR = Path(__file__).resolve().parent / "web"


class AvatarServer:
    """Owns the sessions, the shared avatar, model factory and TTS engine."""

    def __init__(self, args) -> None:
        self.args = args
        self.metrics = Metrics()
        self.registry = SessionRegistry(args, self.metrics)
        self.access = AccessControl(args.api_key, args.cors_origin)
        self.chat = ChatClient.from_options(args)
        self.catalog = Catalog(args)
        self.model_name = self.catalog.model_name
        self.options = session_options(args)
        self._tts = None
        self._tts_task: asyncio.Task | None = None
        self._stt_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.ice_servers = parse_ice_servers(args.ice_server)

    # -- set-up -------------------------------------------------------------------
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
        from tts import make_tts, options_from_args

        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: make_tts(self.args.tts, **options_from_args(self.args)))
        except Exception:
            log.exception("no TTS engine could be loaded: /human is unavailable")
            return None

    async def stt(self):
        """The shared speech-to-text backend (``--stt``), made once off the event loop;
        None with ``--stt none`` or when it cannot be made (logged)."""
        if self.args.stt == "none":
            return None
        if self._stt_task is None:
            self._stt_task = asyncio.ensure_future(self._load_stt())
        return await asyncio.shield(self._stt_task)

    async def _load_stt(self):
        from stt import make_stt

        a = self.args
        options = {"url": a.stt_url, "model": a.stt_model} if a.stt == "openai" else {"model": a.stt_model}
        options = {k: v for k, v in options.items() if v}
        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: make_stt(a.stt, **options))
        except Exception:
            log.exception("no speech-to-text backend could be made: 'mic': 'converse' is unavailable")
            return None

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions -------------------------------------------------------------------
    def session(self, body: dict, request: web.Request, connected: bool = False) -> Session:
        """The session a request names (``sessionid`` in ``body``), if the request may act
        on it. Raises HTTPError 400 (no id), 404 (unknown), 401 (wrong token) or 409
        (``connected`` required and the peer has not connected yet)."""
        sid = body.get("sessionid")
        if sid is None or sid == "":
            raise HTTPError(400, "missing 'sessionid'")
        s = self.registry.get(str(sid))
        if s is None:
            raise HTTPError(404, f"unknown session '{str(sid)[:40]}'")
        if not self.access.authorize_session(request, s):
            raise HTTPError(401, "this session needs its token (or the API key) as 'Authorization: Bearer ...'")
        if connected and not s.connected:
            raise HTTPError(409, "the session's peer has not connected yet; speak once it has")
        return s

    def session_of_query(self, request: web.Request, connected: bool = False) -> Session:
        """The session named by ``?sessionid=`` (GET routes); as :meth:`session`."""
        return self.session(dict(request.query), request, connected)

    # -- handlers -------------------------------------------------------------------
    async def offer(self, request: web.Request) -> web.Response:
        """``POST /offer`` ``{sdp, type: "offer", mic?, avatar?, voice?}``: a new session."""
        body = await read_json(request, self.args.request_timeout)
        sdp, kind = body.get("sdp"), body.get("type")
        if kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            raise HTTPError(400, "expected {'sdp': <offer SDP string>, 'type': 'offer'}")
        session = await self.open_session(sdp, request.remote or "?", mic=body.get("mic"),
                                          avatar=body.get("avatar"), voice=body.get("voice"))
        return web.json_response({"sdp": session.pc.localDescription.sdp, "type": session.pc.localDescription.type,
                                  "sessionid": session.id, "token": session.token, "code": 0})

    async def open_session(self, sdp: str, address: str, mic: Any = None, avatar: Any = None,
                           voice: Any = None, trickle: bool = False) -> Session:
        """Admit a peer's offer ``sdp`` as a new session and answer it.

        ``mic``: None/"off" (incoming audio is drained), "lipsync" (the microphone is
        live speech) or "converse" (a voice conversation through the LLM); ``avatar``
        and ``voice`` are validated against the catalog and the TTS engine. On return
        ``session.pc.localDescription`` is the answer and the session is registered
        (pending until its peer connects). Raises HTTPError: 400 for a bad offer or
        option, 503/429 when the server or the address is full (``registry.admit``).
        ``trickle``: the offer may come without candidates (WHEP players that POST
        before gathering; ICE learns their address from their checks).
        """
        if mic not in (None, "off", "lipsync", "converse"):
            raise HTTPError(400, f"'mic' must be 'lipsync', 'converse' or 'off', got {str(mic)[:20]!r}")
        if mic == "converse" and self.chat is None:
            raise HTTPError(400, "'mic': 'converse' needs an LLM: start the server with --llm_url")
        try:
            check_offer(sdp, candidates=not trickle)
        except ValueError as e:
            raise HTTPError(400, f"bad offer: {e}") from e
        refusal = self.registry.admit(address)
        if refusal is not None:
            raise HTTPError(*refusal)
        try:
            avatar, model_factory = await self.catalog.setup(avatar)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
        tts = await self.tts()
        voice = self._voice(tts, voice)
        stt = await self.stt() if mic == "converse" else None
        if mic == "converse" and (stt is None or tts is None):
            raise HTTPError(400, "'mic': 'converse' needs speech-to-text (--stt) and TTS (--tts); see the server log")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers) if self.ice_servers else None)
        bus = EventBus()
        session = Session(pc, None, bus, address)  # type: ignore[arg-type]
        session.mic = mic if mic in ("lipsync", "converse") else None  # whip.py refuses a second microphone
        sid = session.id
        session.worker = BaseReal(sid, model_factory(), avatar, self.options, self.metrics.session(sid), tts, bus.publish)
        session.worker.voice = voice
        self.registry.add(session)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: %s", sid[:8], pc.connectionState)
            if pc.connectionState == "connected":
                self.registry.on_connected(session)
            elif pc.connectionState in ("failed", "closed"):
                await self.registry.close(session, "ice_failed" if pc.connectionState == "failed" else "peer_closed")

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label == "events":
                attach_data_channel(channel, bus)

        audio_track = AvatarAudioTrack(session.worker)
        if mic == "converse":
            session.agent = ChatAgent(session.worker, bus, tts, self.chat, voice)

        @pc.on("track")
        def on_track(track) -> None:
            # The microphone as live speech (lipsync) or as the user's voice (converse);
            # any other incoming track is drained unused.
            if track.kind == "audio" and mic in ("lipsync", "converse"):
                shorten_receive_buffer(pc, track)
            if track.kind == "audio" and mic == "lipsync":
                self._background(ingest.MicrophoneIngest(session.worker, track).run())
            elif track.kind == "audio" and mic == "converse":
                voice_turns = VoiceConversation(session.worker, bus, session.agent, stt, track, not self.args.no_barge_in)
                audio_track.on_sent = voice_turns.on_sent
                self._background(voice_turns.run())
            else:
                self._background(drain(track))

        try:
            if mic in ("lipsync", "converse"):  # answer the page's sendrecv audio transceiver
                pc.addTransceiver(audio_track, direction="sendrecv")
            else:
                pc.addTrack(audio_track)
            video_sender = pc.addTrack(AvatarVideoTrack(session.worker))
            prefer_video_codec(pc, video_sender, self.args.video_codec, sdp)  # --video_codec, if offered
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # what check_offer cannot see
            await self.registry.close(session, "bad_offer")
            raise HTTPError(400, f"bad offer: {str(e)[:200]}") from e
        log.info("session %s offered from %s (%d open)", sid[:8], address, len(self.registry))
        return session

    async def human(self, request: web.Request) -> web.Response:
        body = await read_json(request, self.args.request_timeout)
        session = self.session(body, request, connected=True)
        text, kind = body.get("text"), body.get("type", "echo")
        if kind not in ("echo", "chat"):
            raise HTTPError(400, f"type must be 'echo' or 'chat', got {str(kind)[:20]!r}")
        if kind == "chat" and self.chat is None:
            raise HTTPError(400, "type 'chat' needs an LLM: start the server with --llm_url (key in $LLM_API_KEY)")
        if not isinstance(text, str) or not text.strip():
            raise HTTPError(400, "'text' must be a non-empty string")
        if len(text) > self.args.max_text_chars:
            raise HTTPError(413, f"text of {len(text)} characters exceeds the limit of {self.args.max_text_chars}")
        if body.get("interrupt"):
            session.worker.interrupt()
        tts = await self.tts()
        voice = self._voice(tts, body.get("voice")) if body.get("voice") is not None else None
        if kind == "chat":
            if tts is None:
                raise HTTPError(400, "no TTS engine is configured for this server")
            if session.agent is None:
                session.agent = ChatAgent(session.worker, session.bus, tts, self.chat)
            session.agent.voice = voice or session.worker.voice
            return ok(utterance=session.agent.ask(text))
        try:
            utterance = session.worker.say(text, voice)
        except TextQueueFull as e:
            raise HTTPError(429, str(e)) from e
        except RuntimeError as e:
            raise HTTPError(400, str(e)) from e
        return ok(utterance=utterance)

    async def humanaudio(self, request: web.Request) -> web.Response:
        limit = int(self.args.max_upload_mb * 1024 * 1024)
        fields = await read_multipart(request, {"file": limit}, self.args.request_timeout)
        session = self.session(fields, request, connected=True)
        if not fields.get("file"):
            raise HTTPError(400, "missing or empty 'file' field")
        loop = asyncio.get_running_loop()
        try:
            pcm = await loop.run_in_executor(
                None, decode_audio, fields["file"], self.args.max_audio_seconds
            )
        except AudioTooLong as e:
            raise HTTPError(413, str(e)) from e
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
        session = self.session(await read_json(request, self.args.request_timeout), request)
        session.worker.interrupt()
        return ok()

    async def is_speaking(self, request: web.Request) -> web.Response:
        session = self.session(await read_json(request, self.args.request_timeout), request)
        return ok(data=session.worker.is_speaking())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model": self.model_name,
                "avatar_id": self.args.avatar_id,
                "latency_mode": self.args.latency_mode,
                "max_session": self.args.max_session,
                "pending": self.registry.pending(),
                "closed": self.metrics.closed_reasons,
                "sessions": {sid[:8]: {"connected": s.connected, **s.worker.status()}
                             for sid, s in self.registry.sessions.items()},
            }
        )

    @staticmethod
    def _voice(tts: Any, voice: Any) -> str | None:
        """A voice the TTS engine has (None: its default). Raises HTTPError(400)."""
        if voice is None or tts is None:
            return None
        if not isinstance(voice, str):
            raise HTTPError(400, "'voice' must be a string (GET /voices lists them)")
        try:
            return tts.check_voice(voice)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e

    async def voices(self, request: web.Request) -> web.Response:
        tts = await self.tts()
        if tts is None:
            return web.json_response({"engine": None, "default": None, "voices": []})
        return web.json_response({"engine": tts.name, "default": tts.default_voice, "voices": tts.voices()})

    async def config(self, request: web.Request) -> web.Response:
        """What the page needs before its offer: ICE servers, features, avatars."""
        return web.json_response({
            "ice_servers": [{"urls": s.urls, **({"username": s.username, "credential": s.credential} if s.username else {})}
                            for s in self.ice_servers],
            "api_key_required": self.args.api_key is not None,
            "chat": self.chat is not None,
            "tts": self.args.tts,
            "model": self.model_name,
            "avatar": self.args.avatar_id,
            "mic_modes": ["off", "lipsync"] + (["converse"] if self.chat is not None and self.args.stt != "none" else []),
        })

    async def avatars(self, request: web.Request) -> web.Response:
        return web.json_response({"avatars": self.catalog.avatar_ids(), "default": self.args.avatar_id})

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /stats?sessionid=``: the session's own figures (for the page's stats panel)."""
        session = self.session_of_query(request)
        return web.json_response({"code": 0, "connected": session.connected, **session.worker.status()})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def on_startup(self, app: web.Application) -> None:
        # aiortc encodes every audio and video frame on the loop's default executor;
        # CPython sizes it by CPU count (6 threads on 2 cores), so a few sessions'
        # encoders queue behind each other and frames go out late. Give each track
        # of each session and of each WHEP viewer a thread (threads start only when
        # needed), plus some for uploads and teardown.
        workers = 2 * self.args.max_session * (1 + getattr(self.args, "max_viewers", 0) + 2) + 4  # +2: a push, Janus
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="media"))
        self._background(self.tts())  # load the voice now, not on the first /offer

    async def on_shutdown(self, app: web.Application) -> None:
        await self.registry.close_all("shutdown")


async def drain(track) -> None:
    """Receive and discard an incoming track nobody uses (its frames would pile up)."""
    from aiortc.contrib.media import MediaBlackhole

    sink = MediaBlackhole()
    sink.addTrack(track)
    await sink.start()
