"""Speech-to-text for a user's voice turns: one small interface, three backends.

Each backend turns one finished turn (mono float32 PCM at ``SAMPLE_RATE``,
16 kHz, as :class:`vad.TurnDetector` hands it out) into text with
``await stt.transcribe(pcm)``. Blocking work runs in a worker thread, so the
event loop never waits on a model.

* :class:`PocketsphinxSTT` -- CMU pocketsphinx with the English model its wheel
  ships (``model/en-us``): offline, small, rough. On this project's CPU it
  decodes ~0.15-0.25 s per second of speech.
* :class:`FasterWhisperSTT` -- faster-whisper (CTranslate2) with a model name or
  path given by the user; an optional dependency (``pip install
  faster-whisper``), imported only when this backend is made.
* :class:`OpenAISTT` -- any OpenAI-compatible ``/v1/audio/transcriptions``
  endpoint (OpenAI, a vLLM or speaches/faster-whisper-server, LocalAI, ...),
  over aiohttp with a bounded timeout; the key comes from ``STT_API_KEY``.

Every failure of a backend to produce text is raised as one :class:`STTError`
with a message that says what to do. :func:`make_stt` picks a backend by name.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import queue
import threading
import wave
from typing import Any, Optional

import numpy as np

from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "STT_CHOICES",
    "STTError",
    "STT",
    "PocketsphinxSTT",
    "FasterWhisperSTT",
    "OpenAISTT",
    "make_stt",
    "pcm_to_wav",
]

logger = logging.getLogger(__name__)

STT_CHOICES = ("pocketsphinx", "faster-whisper", "openai")
# The environment variable holding the OpenAI-compatible endpoint's key.
STT_API_KEY_ENV = "STT_API_KEY"
# OpenAI's own endpoint and model (https://platform.openai.com/docs/api-reference/audio).
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "whisper-1"
# Whole request, connect included: a 30 s turn takes a hosted Whisper a few
# seconds; anything slower would leave the user waiting anyway.
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Longest error body quoted in an STTError.
_BODY_QUOTE_CHARS = 300


class STTError(RuntimeError):
    """A speech-to-text backend could not produce text (the message says why)."""


def _as_pcm(pcm: Any) -> np.ndarray:
    """float32 (n,) in [-1, 1]; ValueError for anything else than mono audio."""
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono PCM of shape (samples,), got shape {x.shape}")
    return np.clip(x, -1.0, 1.0)


def _to_int16(pcm: np.ndarray) -> np.ndarray:
    return np.round(_as_pcm(pcm) * 32767.0).astype(np.int16)


def pcm_to_wav(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono float32 PCM -> a 16-bit PCM WAV file (bytes)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(_to_int16(pcm).tobytes())
    return buf.getvalue()


class STT:
    """The interface: ``await transcribe(pcm) -> str``."""

    name = "stt"

    async def transcribe(self, pcm: np.ndarray) -> str:
        """Transcribe one turn.

        Args:
            pcm: float32 (n,) mono at 16000 Hz, values in [-1, 1].

        Returns:
            the recognised text, stripped ("" for silence or no words).

        Raises:
            STTError: the backend failed (its message says why).
            ValueError: ``pcm`` is not mono audio.
        """
        x = _as_pcm(pcm)
        if len(x) == 0:
            return ""
        return await asyncio.to_thread(self.transcribe_sync, x)

    def transcribe_sync(self, pcm: np.ndarray) -> str:
        """Blocking transcription (what :meth:`transcribe` runs in a thread)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the backend holds (connections); it may be used again after."""


class PocketsphinxSTT(STT):
    """CMU pocketsphinx, offline, with the wheel's US English model by default.

    A pocketsphinx decoder is not thread-safe, so each transcription borrows
    one from a small pool (at most ``decoders``, each ~0.3 s to load and
    ~40 MB); with more turns in flight they wait for a free one.

    Args:
        hmm, lm, dict: acoustic model folder, language model and pronunciation
            dictionary (defaults: the wheel's ``model/en-us``).
        decoders: most decoders in the pool (>= 1).
        **config: more pocketsphinx ``Config`` keys (e.g. ``beam=1e-40``).

    Raises:
        STTError: pocketsphinx is not installed or its model does not load.
    """

    name = "pocketsphinx"

    def __init__(
        self,
        hmm: Optional[str] = None,
        lm: Optional[str] = None,
        dict: Optional[str] = None,  # noqa: A002 - pocketsphinx's own key name
        decoders: int = 1,
        **config: Any,
    ) -> None:
        if decoders < 1:
            raise ValueError(f"decoders must be >= 1, got {decoders!r}")
        try:
            import pocketsphinx  # noqa: F401
        except ImportError as exc:
            raise STTError("pocketsphinx is not installed: pip install pocketsphinx") from exc
        self._config: dict[str, Any] = {"samprate": SAMPLE_RATE, "loglevel": "FATAL", **config}
        for key, value in (("hmm", hmm), ("lm", lm), ("dict", dict)):
            if value is not None:
                self._config[key] = value
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._made = 0
        self._max = decoders
        self._lock = threading.Lock()
        self._pool.put(self._new_decoder())  # load now: fail at start-up, not on the first turn

    def _new_decoder(self):
        from pocketsphinx import Decoder

        try:
            decoder = Decoder(**self._config)
        except Exception as exc:  # RuntimeError / ValueError from a bad model path or key
            raise STTError(f"pocketsphinx could not load its model ({type(exc).__name__}: {exc})") from exc
        with self._lock:
            self._made += 1
        return decoder

    def _borrow(self):
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            can_make = self._made < self._max
        return self._new_decoder() if can_make else self._pool.get()

    def transcribe_sync(self, pcm: np.ndarray) -> str:
        data = _to_int16(pcm).tobytes()
        if not data:
            return ""
        decoder = self._borrow()
        try:
            decoder.start_utt()
            decoder.process_raw(data, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        except Exception as exc:
            raise STTError(f"pocketsphinx failed to decode ({type(exc).__name__}: {exc})") from exc
        finally:
            self._pool.put(decoder)
        return hyp.hypstr.strip() if hyp is not None else ""


class FasterWhisperSTT(STT):
    """faster-whisper (optional dependency), with a model name or path.

    Args:
        model: required: a faster-whisper model name ("tiny.en", "base", "large-v3",
            ...; downloaded by faster-whisper on first use) or a local
            CTranslate2 model folder.
        device: "auto", "cpu" or "cuda".
        compute_type: CTranslate2 compute type ("default", "int8",
            "float16", ...).
        language: ISO code ("en") or None to detect it per turn.
        beam_size: decoding beam (1 = greedy, fastest).
        **options: more ``WhisperModel`` arguments (e.g. ``cpu_threads``).

    Raises:
        STTError: faster-whisper is not installed (the message names
            ``pip install faster-whisper``) or the model does not load.
    """

    name = "faster-whisper"

    def __init__(
        self,
        model: str = "",
        device: str = "auto",
        compute_type: str = "default",
        language: Optional[str] = None,
        beam_size: int = 1,
        **options: Any,
    ) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise STTError(
                "the faster-whisper speech-to-text backend needs the faster-whisper package: "
                "pip install faster-whisper (or choose pocketsphinx or an OpenAI-compatible endpoint)"
            ) from exc
        if not model:
            raise STTError("faster-whisper needs a model name or path (e.g. model='base.en' or a local folder)")
        try:
            self.model = WhisperModel(model, device=device, compute_type=compute_type, **options)
        except Exception as exc:
            raise STTError(f"faster-whisper could not load model {model!r} ({type(exc).__name__}: {exc})") from exc
        self.language = language
        self.beam_size = beam_size
        self._lock = threading.Lock()  # one transcription at a time per model

    def transcribe_sync(self, pcm: np.ndarray) -> str:
        try:
            with self._lock:
                segments, _info = self.model.transcribe(
                    _as_pcm(pcm), language=self.language, beam_size=self.beam_size
                )
                return " ".join(s.text.strip() for s in segments).strip()
        except Exception as exc:
            raise STTError(f"faster-whisper failed ({type(exc).__name__}: {exc})") from exc


class OpenAISTT(STT):
    """An OpenAI-compatible ``POST {url}/audio/transcriptions`` endpoint.

    Sends the turn as a 16 kHz 16-bit WAV in a multipart form (``file``,
    ``model``, ``response_format=json``, optional ``language`` and ``prompt``)
    with ``Authorization: Bearer <key>`` when a key is set, and reads
    ``{"text": ...}`` (or a plain-text body).

    Args:
        url: the API base, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1``; a URL already ending in
            ``/audio/transcriptions`` is used as is.
        model: the model name the endpoint expects.
        api_key: the key; default the ``STT_API_KEY`` environment variable
            (none: no Authorization header, fine for local servers).
        timeout_s: limit on the whole request, connecting included, seconds.
        connect_timeout_s: limit on connecting, seconds.
        language: ISO code passed to the endpoint, or None.
        prompt: optional text to guide the model (names, spellings).
    """

    name = "openai"

    def __init__(
        self,
        url: str = DEFAULT_OPENAI_URL,
        model: str = DEFAULT_OPENAI_MODEL,
        api_key: Optional[str] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        language: Optional[str] = None,
        prompt: Optional[str] = None,
    ) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"the speech-to-text URL must start with http:// or https://, got {url!r}")
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError(f"timeouts must be > 0, got {timeout_s!r} and {connect_timeout_s!r}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/audio/transcriptions") else base + "/audio/transcriptions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(STT_API_KEY_ENV) or None
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.language = language
        self.prompt = prompt

    async def transcribe(self, pcm: np.ndarray) -> str:
        import aiohttp

        x = _as_pcm(pcm)
        if len(x) == 0:
            return ""
        wav = await asyncio.to_thread(pcm_to_wav, x)
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="turn.wav", content_type="audio/wav")
        form.add_field("model", self.model)
        form.add_field("response_format", "json")
        if self.language:
            form.add_field("language", self.language)
        if self.prompt:
            form.add_field("prompt", self.prompt)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
        where = f"speech-to-text endpoint {self.url}"
        try:
            # asyncio.timeout is the backstop: ClientTimeout covers the request,
            # this also covers a DNS lookup that never returns.
            async with asyncio.timeout(self.timeout_s + 1.0):
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(self.url, data=form, headers=headers) as resp:
                        body = await resp.text(errors="replace")
                        status, ctype = resp.status, resp.content_type
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise STTError(f"{where} did not answer within {self.timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            raise STTError(f"{where} is unreachable ({type(exc).__name__}: {exc})") from exc
        if status in (401, 403):
            raise STTError(
                f"{where} refused the key (HTTP {status}); set {STT_API_KEY_ENV}: {body[:_BODY_QUOTE_CHARS]}"
            )
        if status != 200:
            raise STTError(f"{where} answered HTTP {status}: {body[:_BODY_QUOTE_CHARS]}")
        if ctype == "application/json" or body.lstrip().startswith("{"):
            import json

            try:
                data = json.loads(body)
            except ValueError as exc:
                raise STTError(f"{where} answered malformed JSON: {body[:_BODY_QUOTE_CHARS]}") from exc
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise STTError(f"{where} answered JSON without a 'text' string: {body[:_BODY_QUOTE_CHARS]}")
            return data["text"].strip()
        return body.strip()


def make_stt(name: str = "pocketsphinx", **options: Any) -> STT:
    """Create a speech-to-text backend by name.

    Args:
        name: "pocketsphinx", "faster-whisper" (also "whisper",
            "faster_whisper") or "openai" (case-insensitive).
        **options: the backend's constructor arguments, e.g.
            ``make_stt("faster-whisper", model="base.en")`` or
            ``make_stt("openai", url="http://127.0.0.1:8000/v1", model="whisper-1")``.

    Returns:
        an :class:`STT`.

    Raises:
        ValueError: unknown name (the message lists the choices).
        STTError: the backend cannot be made (missing package, model that
            does not load).
    """
    key = (name or "").strip().lower().replace("_", "-")
    if key == "pocketsphinx":
        return PocketsphinxSTT(**options)
    if key in ("faster-whisper", "whisper"):
        return FasterWhisperSTT(**options)
    if key == "openai":
        return OpenAISTT(**options)
    raise ValueError(f"unknown speech-to-text backend {name!r}; choose one of: {', '.join(STT_CHOICES)}")
