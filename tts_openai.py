"""openai: any OpenAI-compatible ``POST /v1/audio/speech`` endpoint, streamed.

OpenAI, and local servers that copy its API (Kokoro-FastAPI, openedai-speech,
LocalAI, ...), answer ``{"model", "input", "voice", "response_format": "pcm"}``
with raw 24 kHz mono s16le audio, written as it is synthesised. This backend
reads it as it arrives and hands each read on at once (converted to 16 kHz by
one :class:`tts.ResampledStream` per sentence), so playback can start before the
sentence is done.

HTTP is the standard library's ``http.client``: the callers are threads (the
session's TTS thread, executor jobs) that iterate the audio synchronously, and
a blocking socket with a timeout bounds every wait without an event loop.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
from typing import Iterator, Optional
from urllib.parse import urlsplit

import numpy as np

from tts import DEFAULT_TIMEOUT_S, TOTAL_TIMEOUT_S, TTS_API_KEY_ENV, ResampledStream, TTS, TTSError, voice_info

__all__ = ["OpenAITTS", "OPENAI_VOICES", "SPEECH_RATE", "S16Stream", "speech_url"]

logger = logging.getLogger("tts")

SPEECH_RATE = 24000  # Hz: the "pcm" response format is 24 kHz mono s16le
READ_BYTES = 4800  # bytes asked of the socket per read: 100 ms of audio (a read returns what has arrived)
ERROR_BODY_BYTES = 4096  # bytes of an error answer read for its message
DEFAULT_VOICE = "alloy"

# OpenAI's six standard voices: (id, name, language, gender). They speak any language.
OPENAI_VOICES = (
    ("alloy", "Alloy", None, "neutral"),
    ("echo", "Echo", None, "male"),
    ("fable", "Fable", None, "male"),
    ("onyx", "Onyx", None, "male"),
    ("nova", "Nova", None, "female"),
    ("shimmer", "Shimmer", None, "female"),
)

# Content types that are not raw PCM: an endpoint that ignored response_format.
_NOT_PCM = ("audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave", "audio/ogg", "audio/opus",
            "audio/aac", "audio/flac", "audio/webm", "application/json", "text/")


def speech_url(url: str) -> str:
    """The speech route of an API base: ``http://h/v1`` -> ``http://h/v1/audio/speech``
    (a URL already ending in ``/audio/speech`` is kept)."""
    u = url.strip().rstrip("/")
    return u if u.endswith("/audio/speech") else u + "/audio/speech"


class S16Stream:
    """Raw s16le mono bytes in pieces of any size -> float32 samples in [-1, 1).

    A piece that ends inside a sample keeps its last byte for the next one, so
    pieces may be cut anywhere.
    """

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> np.ndarray:
        """Bytes -> float32 (samples,) for every whole sample received so far."""
        data = self._carry + data
        whole = len(data) - len(data) % 2
        self._carry = data[whole:]
        return np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / np.float32(32768.0)

    @property
    def pending(self) -> int:
        """Bytes held back (0 or 1)."""
        return len(self._carry)


def _error_message(body: bytes) -> str:
    """An error answer's message: OpenAI's ``{"error": {"message"}}``, else its text."""
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or (data.get("detail") if isinstance(data, dict) else None))
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:300] or "(empty answer)"


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)


class OpenAITTS(TTS):
    """Speech from an OpenAI-compatible ``/v1/audio/speech`` endpoint, streamed.

    Each sentence is one POST; the answer's 24 kHz s16le PCM is converted to
    16 kHz float32 as it arrives. Thread-safe: every call has its own
    connection and voice.

    Args:
        url: the API base (``http://127.0.0.1:8880/v1``) or the full speech URL.
        model: the speech model ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "kokoro", ...).
        voice: the default voice; one not among :data:`OPENAI_VOICES` is offered
            as well (local servers have their own names). Default "alloy".
        api_key: sent as ``Authorization: Bearer``; default ``$TTS_API_KEY``
            (none: no header).
        timeout: the longest wait, in seconds, to connect, for the answer's
            head, and for each read of its body.
        total_timeout: the longest a sentence's audio may take, in seconds
            (checked between reads, so a call ends within ``total_timeout +
            timeout``).
        speed: the endpoint's ``speed`` (0.25-4.0); None: not sent.
        read_bytes: bytes asked of the socket per read (any size: reads cut
            samples anywhere).

    Raises:
        ValueError: ``url`` is not an http(s) URL.
    """

    name = "openai"

    def __init__(
        self,
        url: str,
        model: str = "tts-1",
        voice: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        total_timeout: float = TOTAL_TIMEOUT_S,
        speed: Optional[float] = None,
        read_bytes: int = READ_BYTES,
    ) -> None:
        self.url = speech_url(url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the TTS URL must be http(s)://host[:port]/..., got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        try:
            self._port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in the TTS URL {url!r}") from exc
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.model = model
        self.api_key = api_key if api_key is not None else (os.environ.get(TTS_API_KEY_ENV) or None)
        self.timeout = float(timeout)
        self.total_timeout = float(total_timeout)
        self.speed = speed
        self.read_bytes = max(1, int(read_bytes))
        self._infos = [voice_info(*v) for v in OPENAI_VOICES]
        if voice and voice not in {v["id"] for v in self._infos}:
            self._infos.insert(0, voice_info(voice))
        self.default_voice = voice or DEFAULT_VOICE

    def voices(self) -> list[dict]:
        """The six standard voices and ``voice`` (the default first); see :meth:`tts.TTS.voices`."""
        infos = sorted(self._infos, key=lambda v: v["id"] != self.default_voice)
        return [dict(v) for v in infos]

    def _error(self, kind: str, detail: str, status: Optional[int] = None) -> TTSError:
        return TTSError(self.name, self.url, kind, detail, status)

    def _open(self, sentence: str, voice: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST the sentence; returns the connection and its 200 answer (head read).

        Raises:
            TTSError: no connection, no answer in time, an HTTP error, or an
                answer that is not raw PCM.
        """
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            try:
                conn.connect()
            except TimeoutError:
                raise self._error("unreachable", f"no connection within {self.timeout:g} s") from None
            except OSError as exc:
                raise self._error("unreachable", _reason(exc)) from exc
            body = {"model": self.model, "input": sentence, "voice": voice, "response_format": "pcm"}
            if self.speed is not None:
                body["speed"] = self.speed
            headers = {"Content-Type": "application/json", "Accept": "audio/pcm, application/octet-stream, */*"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            try:
                conn.request("POST", self._path, body=json.dumps(body).encode(), headers=headers)
                resp = conn.getresponse()
            except TimeoutError:
                raise self._error("timeout", f"no answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise self._error("unreachable", f"the connection failed ({_reason(exc)})") from exc
            if resp.status != 200:
                try:
                    detail = _error_message(resp.read(ERROR_BODY_BYTES))
                except (OSError, http.client.HTTPException):
                    detail = resp.reason or "(no message)"
                raise self._error("status", detail, resp.status)
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and any(ctype.startswith(t) for t in _NOT_PCM):
                raise self._error("stream", f"the answer is {ctype}, not raw PCM (does it take response_format \"pcm\"?)")
            return conn, resp
        except BaseException:
            conn.close()
            raise

    def _chunks(self, sentence: str, voice: str) -> Iterator[np.ndarray]:
        """float32 16 kHz pieces, one per read of the answer (plus the filter's tail).

        Raises:
            TTSError: see :meth:`_open`; a read waits over ``timeout``; the
                sentence takes over ``total_timeout``; the stream breaks. An empty
                answer is no audio, not an error.
        """
        deadline = time.monotonic() + self.total_timeout
        conn, resp = self._open(sentence, voice)
        try:
            pcm, conv = S16Stream(), ResampledStream(SPEECH_RATE)
            while True:
                if time.monotonic() > deadline:
                    raise self._error("timeout", f"the sentence's audio took over {self.total_timeout:g} s")
                try:
                    data = resp.read1(self.read_bytes)
                except TimeoutError:
                    raise self._error("timeout", f"no audio for {self.timeout:g} s") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise self._error("stream", f"the audio stream broke ({_reason(exc)})") from exc
                if not data:
                    break
                out = conv.process(pcm.feed(data))
                if out.size:
                    yield out
            if pcm.pending:
                logger.debug("openai TTS: the answer ended inside a sample; its last byte was dropped")
            yield conv.finish()
        finally:
            conn.close()
