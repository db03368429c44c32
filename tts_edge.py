"""edge: Microsoft Edge's online voices through the ``edge-tts`` package.

The service streams MP3 (24 kHz mono, 48 kbit/s) over a WebSocket as it
synthesises; :class:`MP3Stream` decodes it piece by piece with PyAV (FFmpeg's
MP3 parser and decoder), and one :class:`tts.ResampledStream` per sentence
converts it to 16 kHz, so each network message is handed on as audio at once.

``edge-tts`` is asyncio-based and imported only when this backend is made. Its
coroutines run on one private event-loop thread shared by every
:class:`EdgeTTS`; the synthesising thread waits on each step with a timeout, so
a stalled service raises :class:`tts.TTSError` instead of hanging a session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import math
import queue
import threading
import time
from typing import Any, Iterator, Optional

import av
import numpy as np

from tts import DEFAULT_TIMEOUT_S, TOTAL_TIMEOUT_S, ResampledStream, TTS, TTSError, voice_info

__all__ = ["EdgeTTS", "EDGE_VOICES", "MP3Stream"]

logger = logging.getLogger("tts")

DEFAULT_VOICE = "en-US-EmmaMultilingualNeural"  # edge-tts's own default
ID3_HEADER_BYTES = 10  # an ID3v2 tag's header: "ID3", version (2), flags (1), syncsafe size (4)

# Common English voices, offered when the service's own list cannot be fetched:
# (ShortName, name, language, gender).
EDGE_VOICES = (
    ("en-US-EmmaMultilingualNeural", "Emma (multilingual)", "en-US", "female"),
    ("en-US-AndrewMultilingualNeural", "Andrew (multilingual)", "en-US", "male"),
    ("en-US-AvaMultilingualNeural", "Ava (multilingual)", "en-US", "female"),
    ("en-US-BrianMultilingualNeural", "Brian (multilingual)", "en-US", "male"),
    ("en-US-AriaNeural", "Aria", "en-US", "female"),
    ("en-US-JennyNeural", "Jenny", "en-US", "female"),
    ("en-US-MichelleNeural", "Michelle", "en-US", "female"),
    ("en-US-AnaNeural", "Ana", "en-US", "female"),
    ("en-US-GuyNeural", "Guy", "en-US", "male"),
    ("en-US-ChristopherNeural", "Christopher", "en-US", "male"),
    ("en-US-EricNeural", "Eric", "en-US", "male"),
    ("en-US-RogerNeural", "Roger", "en-US", "male"),
    ("en-US-SteffanNeural", "Steffan", "en-US", "male"),
    ("en-GB-SoniaNeural", "Sonia", "en-GB", "female"),
    ("en-GB-LibbyNeural", "Libby", "en-GB", "female"),
    ("en-GB-MaisieNeural", "Maisie", "en-GB", "female"),
    ("en-GB-RyanNeural", "Ryan", "en-GB", "male"),
    ("en-GB-ThomasNeural", "Thomas", "en-GB", "male"),
    ("en-AU-NatashaNeural", "Natasha", "en-AU", "female"),
    ("en-AU-WilliamNeural", "William", "en-AU", "male"),
    ("en-CA-ClaraNeural", "Clara", "en-CA", "female"),
    ("en-CA-LiamNeural", "Liam", "en-CA", "male"),
    ("en-IN-NeerjaNeural", "Neerja", "en-IN", "female"),
    ("en-IN-PrabhatNeural", "Prabhat", "en-IN", "male"),
    ("en-IE-EmilyNeural", "Emily", "en-IE", "female"),
    ("en-IE-ConnorNeural", "Connor", "en-IE", "male"),
)

class MP3Stream:
    """MP3 bytes in pieces of any size -> float32 mono PCM at the stream's rate.

    FFmpeg's MP3 parser finds the frames in whatever pieces arrive (holding a
    partial frame for the next piece) and its float decoder decodes them. A
    leading ID3v2 tag is skipped; an undecodable frame is dropped (the decoder
    resynchronises on the next). Channels are averaged.

    Attributes:
        sample_rate: the stream's rate in Hz (None until a frame is decoded).
        frames_dropped: frames the decoder refused.
    """

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("mp3float", "r")
        self._head = b""  # the first bytes, until it is known whether they start an ID3 tag
        self._skip = 0  # bytes of an ID3 tag still to drop
        self._started = False
        self.sample_rate: Optional[int] = None
        self.frames_dropped = 0

    def feed(self, data: bytes) -> np.ndarray:
        """Bytes -> float32 (samples,) of every frame completed by them (may be empty).

        Raises:
            ValueError: the sample rate changes within the stream.
        """
        data = self._strip_id3(data)
        if not data:
            return np.zeros(0, np.float32)
        return self._decode(self._codec.parse(data))

    def flush(self) -> np.ndarray:
        """The frames still held by the parser and the decoder (end of stream)."""
        if not self._started and self._head:  # a stream shorter than an ID3 header
            self._started, head, self._head = True, self._head, b""
            out = self._decode(self._codec.parse(head))
        else:
            out = np.zeros(0, np.float32)
        tail = self._decode(self._codec.parse(None))
        try:
            rest = [self._mono(f) for f in self._codec.decode(None)]
        except av.error.FFmpegError:
            rest = []
        return np.concatenate([out, tail] + rest).astype(np.float32, copy=False)

    def _strip_id3(self, data: bytes) -> bytes:
        if not self._started:
            self._head += data
            if len(self._head) < ID3_HEADER_BYTES:
                return b""
            self._started, data, self._head = True, self._head, b""
            if data[:3] == b"ID3":
                size = 0
                for b in data[6:10]:
                    size = (size << 7) | (b & 0x7F)
                footer = 10 if data[5] & 0x10 else 0
                self._skip = ID3_HEADER_BYTES + size + footer
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        return data

    def _decode(self, packets: list) -> np.ndarray:
        out = []
        for packet in packets:
            try:
                frames = self._codec.decode(packet)
            except av.error.InvalidDataError:
                self.frames_dropped += 1
                continue
            out.extend(self._mono(f) for f in frames)
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)

    def _mono(self, frame: av.AudioFrame) -> np.ndarray:
        if self.sample_rate is None:
            self.sample_rate = int(frame.sample_rate)
        elif frame.sample_rate != self.sample_rate:
            raise ValueError(f"the MP3 stream changed rate from {self.sample_rate} to {frame.sample_rate} Hz")
        arr = frame.to_ndarray()
        channels = len(frame.layout.channels) or 1
        arr = arr.reshape(channels, -1) if frame.format.is_planar else arr.reshape(-1, channels).T
        if frame.format.name.rstrip("p") == "s16":
            arr = arr.astype(np.float32) / np.float32(32768.0)
        return arr[0].astype(np.float32, copy=False) if channels == 1 else arr.mean(axis=0, dtype=np.float32)


class _Loop:
    """One event loop on a daemon thread, for every edge-tts coroutine in the process."""

    _lock = threading.Lock()
    _loop: Optional[asyncio.AbstractEventLoop] = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="tts-edge-loop", daemon=True).start()
                cls._loop = loop
            return cls._loop


class EdgeTTS(TTS):
    """Microsoft Edge's online neural voices (the ``edge-tts`` package), streamed.

    Thread-safe: every call has its own connection and voice. Voices are the
    ShortNames of the service ("en-US-AriaNeural"): the list fetched by
    :meth:`refresh_voices` when the service is reachable, else :data:`EDGE_VOICES`.

    Args:
        voice: the default voice (a ShortName; one not in the list is offered
            as well). Default "en-US-EmmaMultilingualNeural".
        timeout: the longest wait, in seconds, to connect and for each message.
        total_timeout: the longest a sentence's audio may take, in seconds.
        rate, volume, pitch: edge-tts prosody ("+10%", "-5%", "+0Hz").

    Raises:
        ImportError: edge-tts is not installed (the message says how to add it).
        ValueError: edge-tts refuses the voice's form or the prosody.
    """

    name = "edge"

    def __init__(
        self,
        voice: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        total_timeout: float = TOTAL_TIMEOUT_S,
        rate: str = "+0%",
        volume: str = "+0%",
        pitch: str = "+0Hz",
    ) -> None:
        try:
            edge_tts = importlib.import_module("edge_tts")
        except ImportError as exc:
            raise ImportError("--tts edge needs the edge-tts package: pip install edge-tts") from exc
        self.timeout = float(timeout)
        self.total_timeout = float(total_timeout)
        self.prosody = {"rate": rate, "volume": volume, "pitch": pitch}
        self.default_voice = voice or DEFAULT_VOICE
        try:  # edge-tts checks the voice's form and the prosody (no network)
            edge_tts.Communicate("-", self.default_voice, **self.prosody)
        except ValueError as exc:
            raise ValueError(f"edge-tts refuses voice {self.default_voice!r} or prosody {self.prosody}: {exc}") from exc
        self._infos = self._with_default([voice_info(*v) for v in EDGE_VOICES])

    @property
    def url(self) -> str:
        """The service's WebSocket URL (without its query)."""
        from edge_tts import communicate

        return communicate.WSS_URL.split("?")[0]

    def _with_default(self, infos: list[dict]) -> list[dict]:
        if self.default_voice not in {v["id"] for v in infos}:
            infos.insert(0, voice_info(self.default_voice))
        return infos

    def voices(self) -> list[dict]:
        """The offered voices, the default first; see :meth:`tts.TTS.voices`."""
        infos = sorted(self._infos, key=lambda v: v["id"] != self.default_voice)
        return [dict(v) for v in infos]

    def _error(self, kind: str, detail: str, status: Optional[int] = None) -> TTSError:
        return TTSError(self.name, self.url, kind, detail, status)

    def refresh_voices(self, timeout: Optional[float] = None) -> bool:
        """Replace the voice list with the service's, when it answers in time.

        Args:
            timeout: seconds to wait (default: ``timeout``).

        Returns:
            True when the list was fetched; False (logged, the list unchanged)
            when the service is unreachable or answers nonsense.
        """
        import edge_tts

        wait = self.timeout if timeout is None else float(timeout)
        fut = asyncio.run_coroutine_threadsafe(edge_tts.list_voices(), _Loop.get())
        try:
            data = fut.result(wait)
            infos = [
                voice_info(v["ShortName"], v.get("FriendlyName") or v["ShortName"], v.get("Locale"),
                           (v.get("Gender") or "").lower() or None)
                for v in data
            ]
        except Exception as exc:  # unreachable, timeout, malformed list: keep the built-in one
            fut.cancel()
            logger.warning("edge TTS: voice list unavailable (%s); offering %d built-in English voices",
                           _reason(exc) if not isinstance(exc, concurrent.futures.TimeoutError)
                           else f"no answer within {wait:g} s", len(EDGE_VOICES))
            return False
        if not infos:
            return False
        self._infos = self._with_default(infos)
        return True

    def _chunks(self, sentence: str, voice: str) -> Iterator[np.ndarray]:
        """float32 16 kHz pieces, one per MP3 message that completes a frame (plus the tail).

        The edge-tts stream runs as one task on the shared loop, handing its
        audio messages over through a queue (at most a sentence's MP3, ~6 kB/s
        of speech); leaving the iteration early cancels the task, which closes
        the WebSocket.

        Raises:
            TTSError: no connection, a WebSocket or protocol error, no audio,
                no message within ``timeout``, or over ``total_timeout`` in all.
        """
        import edge_tts

        secs = max(1, math.ceil(self.timeout))  # edge-tts takes whole seconds
        comm = edge_tts.Communicate(sentence, voice, connect_timeout=secs, receive_timeout=secs, **self.prosody)
        messages: queue.Queue = queue.Queue()
        task = asyncio.run_coroutine_threadsafe(_pump(comm, messages), _Loop.get())
        deadline = time.monotonic() + self.total_timeout
        try:
            mp3 = MP3Stream()
            conv: Optional[ResampledStream] = None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error("timeout", f"the sentence's audio took over {self.total_timeout:g} s")
                wait = min(remaining, self.timeout)
                try:
                    kind, value = messages.get(timeout=wait)
                except queue.Empty:
                    raise self._error("timeout", f"no answer within {wait:g} s") from None
                if kind == "end":
                    break
                if kind == "error":
                    raise self._failure(value, voice) from value
                try:
                    pcm = mp3.feed(value)
                except ValueError as exc:
                    raise self._error("stream", str(exc)) from exc
                if pcm.size:
                    conv = conv or ResampledStream(mp3.sample_rate)
                    out = conv.process(pcm)
                    if out.size:
                        yield out
            pcm = mp3.flush()
            if pcm.size:
                conv = conv or ResampledStream(mp3.sample_rate)
                yield conv.process(pcm)
            if conv is not None:
                yield conv.finish()
        finally:
            task.cancel()  # no-op when done; else the task is cancelled on the loop and its WebSocket closed

    def _failure(self, exc: BaseException, voice: str) -> TTSError:
        """The :class:`tts.TTSError` for what the edge-tts stream raised."""
        import aiohttp
        import edge_tts

        if isinstance(exc, aiohttp.ClientResponseError):  # the handshake refused, by the service or a proxy
            return self._error("status", exc.message or "WebSocket handshake refused", exc.status)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):  # before OSError: TimeoutError is one
            return self._error("timeout", f"no answer within {self.timeout:g} s")
        if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
            return self._error("unreachable", _reason(exc))
        if isinstance(exc, edge_tts.exceptions.NoAudioReceived):
            return self._error("stream", f"no audio received (is {voice!r} an Edge voice?)")
        return self._error("stream", f"{type(exc).__name__}: {_reason(exc)}")


async def _pump(comm: Any, messages: queue.Queue) -> None:
    """Run one edge-tts stream: ("audio", bytes) per audio message, then ("end", None)
    or ("error", exception)."""
    try:
        async for msg in comm.stream():
            if msg.get("type") == "audio":
                messages.put(("audio", msg["data"]))
        messages.put(("end", None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # handed to the synthesising thread, which raises TTSError
        messages.put(("error", exc))


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)
