"""A fake OpenAI-compatible endpoint for tests: chat, speech and transcription.

:class:`FakeOpenAI` is a small aiohttp app on a free loopback port, run on its own
event loop in a daemon thread, so sync tests, ``asyncio.run`` tests and server
subprocesses can all use it (``--llm_url fake.url``)::

    with FakeOpenAI(reply="Hello there. How are you?", token_delay=0.05) as fake:
        ...  # point a client at fake.url ("http://127.0.0.1:PORT/v1")
        fake.chats[-1].messages, fake.chats[-1].sent, fake.chats[-1].closed_early

Routes (OpenAI's wire formats):

- ``GET /v1/models``: one model, :attr:`FakeOpenAI.model`.
- ``POST /v1/chat/completions``: with ``"stream": true``, Server-Sent Events
  ``data: {"id", "object": "chat.completion.chunk", "created", "model", "choices":
  [{"index": 0, "delta": {...}, "finish_reason": null}]}``: first a role chunk
  (sent at once, with the headers), then one chunk per token (the first after
  ``first_token_delay`` s, the others ``token_delay`` s apart), a ``finish_reason:
  "stop"`` chunk, and ``data: [DONE]``. Without ``stream``, one ``chat.completion``.
  Tokens are :attr:`tokens` if set, else :attr:`reply` (a string, or a function of
  the request's messages) cut before each space. Each request is a
  :class:`ChatRecord`: the messages, when each token was sent, and whether the
  client closed the connection before the end (the handler is cancelled at once).
- ``POST /v1/audio/speech``: JSON ``{model, input, voice, response_format}``; a
  tone (or espeak speech, ``speech="espeak"``) for ``input``, 24 kHz mono s16le, as
  ``response_format`` ``"wav"`` or ``"pcm"`` (raw); any other format (OpenAI's
  default is mp3) is a 400. Sent in 100 ms chunks, ``speech_chunk_delay`` s apart.
- ``POST /v1/audio/transcriptions``: multipart ``file`` + ``model`` (+ optional
  fields); answers ``{"text": transcript}`` (``response_format: "text"``: plain).

Set :attr:`status` to an HTTP error status to answer every POST with it and an
OpenAI error body. Everything is recorded in :attr:`chats`, :attr:`speeches`,
:attr:`transcriptions` (times from ``time.monotonic()``, this process's clock).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
import wave
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
from aiohttp import web

SPEECH_RATE = 24000  # Hz, OpenAI's pcm output: 24 kHz mono s16le
SPEECH_CHUNK_S = 0.1  # speech is written in chunks of this many seconds
TONE_WORD_S = 0.25  # seconds of tone per word of input
TONE_HZ = 220.0


@dataclass
class ChatRecord:
    """One ``/v1/chat/completions`` request and what became of it."""

    body: dict
    authorization: Optional[str]
    t_start: float  # monotonic s, request received
    tokens: list[str] = field(default_factory=list)  # what was to be sent
    sent: list[tuple[float, str]] = field(default_factory=list)  # (monotonic s the write began, token)
    completed: bool = False  # [DONE] written
    closed_early: bool = False  # the client went away before [DONE]
    t_closed: Optional[float] = None  # monotonic s the close was seen

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages", [])


@dataclass
class SpeechRecord:
    body: dict
    authorization: Optional[str]
    samples: int = 0  # 24 kHz samples answered


@dataclass
class TranscriptionRecord:
    fields: dict[str, str]  # the form fields but the file (model, language, ...)
    filename: Optional[str]
    content_type: Optional[str]
    audio: bytes
    authorization: Optional[str]


def split_tokens(text: str) -> list[str]:
    """``text`` cut before each whitespace run, as LLM tokens often are: ``"Hi there."``
    -> ``["Hi", " there."]``; joined they give ``text`` back."""
    return re.findall(r"\s*\S+|\s+$", text)


def tone(text: str, rate: int = SPEECH_RATE) -> np.ndarray:
    """A float32 tone of :data:`TONE_WORD_S` per word of ``text`` (at least one), with
    a rise and fall per word so that a lip-sync model moves the mouth."""
    words = max(1, len(text.split()))
    n_word = int(TONE_WORD_S * rate)
    t = np.arange(words * n_word) / rate
    envelope = np.tile(np.sin(np.pi * np.arange(n_word) / n_word), words)
    return (0.3 * envelope * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def espeak(text: str, rate: int = SPEECH_RATE) -> np.ndarray:
    """espeak-ng speech of ``text`` (``tts.EspeakTTS``) resampled to ``rate``."""
    from audio import resample
    from tts import SAMPLE_RATE, EspeakTTS

    return resample(EspeakTTS().synthesize(text), SAMPLE_RATE, rate)


def _wav_bytes(pcm16: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16)
    return buf.getvalue()


class FakeOpenAI:
    """The fake endpoint; attributes may be changed between requests.

    Args:
        reply: the chat answer, or ``f(messages) -> str``.
        tokens: the chat answer's exact tokens (overrides ``reply``).
        first_token_delay: request -> first content token (s).
        token_delay: between content tokens (s).
        status: answer every POST with this HTTP status when not 200.
        transcript: the transcription's text.
        speech: ``"tone"``, ``"espeak"`` or ``f(text) -> float32 PCM at 24 kHz``.
        speech_chunk_delay: between the 100 ms chunks of a speech answer (s).
        model: the model ``GET /v1/models`` lists.
    """

    def __init__(
        self,
        reply: Union[str, Callable[[list[dict]], str]] = "Hello there. I am a fake model.",
        tokens: Optional[list[str]] = None,
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        status: int = 200,
        transcript: str = "Hello avatar.",
        speech: Union[str, Callable[[str], np.ndarray]] = "tone",
        speech_chunk_delay: float = 0.0,
        model: str = "fake-model",
    ) -> None:
        self.reply = reply
        self.tokens = tokens
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.status = status
        self.transcript = transcript
        self.speech = speech
        self.speech_chunk_delay = speech_chunk_delay
        self.model = model
        self.chats: list[ChatRecord] = []
        self.speeches: list[SpeechRecord] = []
        self.transcriptions: list[TranscriptionRecord] = []
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The API base to give a client: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_post("/v1/audio/transcriptions", self._transcription)
        return app

    async def _serve(self) -> None:
        # handler_cancellation: a client that goes away cancels its handler at once
        self._runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeOpenAI":
        """Serve on a free loopback port from a daemon thread; returns self."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI endpoint did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ---------------------------------------------------------------------

    def _error(self) -> web.Response:
        return web.json_response(
            {"error": {"message": f"fake error {self.status}", "type": "server_error", "param": None, "code": None}},
            status=self.status,
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rec = ChatRecord(body, request.headers.get("Authorization"), time.monotonic())
        self.chats.append(rec)
        if self.status != 200:
            return self._error()
        text = self.reply(rec.messages) if callable(self.reply) else self.reply
        rec.tokens = list(self.tokens) if self.tokens is not None else split_tokens(text)
        cid, created = f"chatcmpl-fake{len(self.chats)}", int(time.time())
        model = body.get("model", self.model)
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(rec.tokens)},
                             "finish_reason": "stop"}],
            })

        def chunk(delta: dict, finish: Optional[str] = None) -> bytes:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            await resp.write(chunk({"role": "assistant", "content": ""}))
            for i, tok in enumerate(rec.tokens):
                await asyncio.sleep(self.first_token_delay if i == 0 else self.token_delay)
                t_send = time.monotonic()
                await resp.write(chunk({"content": tok}))
                rec.sent.append((t_send, tok))
            await resp.write(chunk({}, "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            rec.completed = True
        except (asyncio.CancelledError, ConnectionError):
            rec.closed_early, rec.t_closed = True, time.monotonic()
            raise
        return resp

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rec = SpeechRecord(body, request.headers.get("Authorization"))
        self.speeches.append(rec)
        if self.status != 200:
            return self._error()
        fmt = body.get("response_format", "mp3")
        if fmt not in ("wav", "pcm"):
            return web.json_response(
                {"error": {"message": f"fake supports response_format wav and pcm, not {fmt}",
                           "type": "invalid_request_error", "param": "response_format", "code": None}},
                status=400,
            )
        make = {"tone": tone, "espeak": espeak}.get(self.speech, self.speech) if isinstance(self.speech, str) else self.speech
        pcm = np.clip(make(str(body.get("input", ""))), -1, 1)
        rec.samples = len(pcm)
        data = (pcm * 32767).astype("<i2").tobytes()
        if fmt == "wav":
            data = _wav_bytes(data, SPEECH_RATE)
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav" if fmt == "wav" else "audio/pcm"})
        await resp.prepare(request)
        step = int(SPEECH_CHUNK_S * SPEECH_RATE) * 2
        for i in range(0, len(data), step):
            if i and self.speech_chunk_delay:
                await asyncio.sleep(self.speech_chunk_delay)
            await resp.write(data[i : i + step])
        await resp.write_eof()
        return resp

    async def _transcription(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        fields = {k: str(v) for k, v in form.items() if k != "file"}
        rec = TranscriptionRecord(
            fields,
            getattr(upload, "filename", None),
            getattr(upload, "content_type", None),
            upload.file.read() if hasattr(upload, "file") else b"",
            request.headers.get("Authorization"),
        )
        self.transcriptions.append(rec)
        if self.status != 200:
            return self._error()
        if not hasattr(upload, "file") or "model" not in fields:
            return web.json_response(
                {"error": {"message": "multipart 'file' and 'model' are required", "type": "invalid_request_error",
                           "param": None, "code": None}},
                status=400,
            )
        if fields.get("response_format") == "text":
            return web.Response(text=self.transcript)
        return web.json_response({"text": self.transcript})

