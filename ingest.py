"""Live speech in: the WebSocket audio stream (``GET /ws``) and the WebRTC microphone.

WebSocket protocol (one socket, any number of utterances):

- Text, client -> server (JSON):
  ``{"type": "start", "sample_rate": 16000, "format": "s16le", "channels": 1,
  "framing": "raw", "interrupt": false}`` opens an utterance (every field has the
  default shown; ``sample_rate`` 8000-48000 Hz, ``format`` s16le | f32le,
  ``channels`` 1 | 2 (averaged), ``framing`` raw | crc32, ``interrupt: true``
  interrupts first); ``{"type": "end"}`` closes it (what was sent plays out, then
  ``playback_finished``); ``{"type": "interrupt"}`` stops speaking now.
- Binary, client -> server: the open utterance's audio, 10 ms to 2 s a message.
  ``framing: raw``: the message is PCM. ``framing: crc32``: see :func:`parse_frame`.
- Text, server -> client: the session's events (``events.py``), and ``error``
  events about this socket's own messages (``{"type": "error", "msg", "seq"?}``).

Audio is resampled to 16 kHz as a stream (``audio.StreamResampler``) and queued
as it comes: it plays as soon as the model's lookahead has arrived. A producer
faster than real time is held back by the session's audio budget (the socket stops
being read: TCP backpressure); one slower than real time gets idle slots (silence,
mouth closed) until its audio arrives. Nothing accepted is dropped, except by an
interrupt; every refused message is answered with an ``error``.

The WebRTC microphone (``"mic": "lipsync"`` in the offer) is the same kind of live
source: :class:`MicrophoneIngest` cuts the peer's audio track into talk spurts, one
utterance each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from aiohttp import WSMsgType, web

from audio import PCM_FORMATS, StreamResampler, pcm_to_mono
from baseasr import UTTERANCE_ABANDON_S, VAD_THRESHOLD_DBFS, SpeechQueueFull
from clock import CHUNK_MS, SAMPLE_RATE

if TYPE_CHECKING:
    from basereal import BaseReal

log = logging.getLogger(__name__)

# crc32 framing (the browser-microphone protocol this project grew from), little-endian:
# magic u32, message_type u8, seq u32, payload_length u32, payload, crc32(payload) u32.
FRAME_MAGIC = 0x12345678
MSG_AUDIO = 0x01
FRAME_HEADER = struct.Struct("<IBII")  # 13 bytes
FRAME_TRAILER = struct.Struct("<I")  # 4 bytes
FRAME_OVERHEAD = FRAME_HEADER.size + FRAME_TRAILER.size  # 17 bytes

MIN_RATE, MAX_RATE = 8000, 48000  # Hz accepted in "start"
MAX_CHANNELS = 2
FRAMINGS = ("raw", "crc32")
MAX_MESSAGE_S = 2.0  # longest audio in one binary message (s)
MAX_TEXT_BYTES = 4096  # longest control message
# Largest binary message: 2 s of 48 kHz stereo f32le plus the framing.
MAX_BINARY_BYTES = int(MAX_MESSAGE_S * MAX_RATE) * MAX_CHANNELS * 4 + FRAME_OVERHEAD
WS_HEARTBEAT_S = 20.0  # ping interval; a peer that answers no ping is closed

# Microphone talk spurts: a spurt opens on the first 20 ms chunk above the VAD
# threshold (with MIC_PREROLL_MS of audio before it, so onsets are not clipped) and
# closes after MIC_HANGOVER_MS below it.
MIC_PREROLL_MS = 100
MIC_HANGOVER_MS = 600


class FramingError(ValueError):
    """A malformed crc32-framed message. ``seq`` is its header's seq when readable."""

    def __init__(self, msg: str, seq: int | None = None) -> None:
        super().__init__(msg)
        self.seq = seq


def parse_frame(data: bytes) -> tuple[int, memoryview]:
    """Parse one crc32-framed audio message; returns (seq, payload).

    Layout (little-endian): ``magic u32 = 0x12345678``, ``message_type u8 = 0x01``
    (audio), ``seq u32``, ``payload_length u32``, payload, ``crc32 u32`` of the
    payload (zlib's CRC-32).

    Raises:
        FramingError: too short, bad magic, unknown message type, a payload length
            that disagrees with the message size, or a CRC mismatch.
    """
    n = len(data)
    if n < FRAME_OVERHEAD:
        raise FramingError(f"message of {n} bytes is shorter than the {FRAME_OVERHEAD}-byte framing")
    magic, kind, seq, length = FRAME_HEADER.unpack_from(data, 0)
    if magic != FRAME_MAGIC:
        raise FramingError(f"bad magic 0x{magic:08x} (expected 0x{FRAME_MAGIC:08x})", seq)
    if kind != MSG_AUDIO:
        raise FramingError(f"unknown message type 0x{kind:02x} (0x01 is audio)", seq)
    if length != n - FRAME_OVERHEAD:
        raise FramingError(f"payload_length {length} disagrees with the message ({n - FRAME_OVERHEAD} payload bytes)", seq)
    payload = memoryview(data)[FRAME_HEADER.size : n - FRAME_TRAILER.size]
    (crc,) = FRAME_TRAILER.unpack_from(data, n - FRAME_TRAILER.size)
    if zlib.crc32(payload) != crc:
        raise FramingError(f"CRC mismatch (got 0x{crc:08x}, payload has 0x{zlib.crc32(payload):08x})", seq)
    return seq, payload


def build_frame(seq: int, payload: bytes) -> bytes:
    """The crc32-framed message carrying ``payload`` (for clients and tests)."""
    return FRAME_HEADER.pack(FRAME_MAGIC, MSG_AUDIO, seq, len(payload)) + bytes(payload) + FRAME_TRAILER.pack(zlib.crc32(payload))


@dataclass(frozen=True)
class StreamFormat:
    """The audio format an utterance's ``start`` message declares."""

    sample_rate: int = SAMPLE_RATE
    format: str = "s16le"
    channels: int = 1
    framing: str = "raw"
    interrupt: bool = False

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame (all channels)."""
        return PCM_FORMATS[self.format].itemsize * self.channels

    @property
    def max_payload(self) -> int:
        """Most PCM bytes one message may carry (MAX_MESSAGE_S of audio)."""
        return int(MAX_MESSAGE_S * self.sample_rate) * self.frame_bytes


def parse_start(msg: dict[str, Any]) -> StreamFormat:
    """Validate a ``start`` message. Raises ValueError with what is wrong."""
    rate = msg.get("sample_rate", SAMPLE_RATE)
    if type(rate) is not int or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {str(rate)[:20]!r}")
    fmt = msg.get("format", "s16le")
    if fmt not in PCM_FORMATS:
        raise ValueError(f"format must be one of {sorted(PCM_FORMATS)}, got {str(fmt)[:20]!r}")
    channels = msg.get("channels", 1)
    if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"channels must be 1 or 2, got {str(channels)[:20]!r}")
    framing = msg.get("framing", "raw")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {list(FRAMINGS)}, got {str(framing)[:20]!r}")
    interrupt = msg.get("interrupt", False)
    if type(interrupt) is not bool:
        raise ValueError("interrupt must be true or false")
    return StreamFormat(rate, fmt, channels, framing, interrupt)


async def push_live(worker: "BaseReal", pcm: np.ndarray, utterance: int, text: str | None = None) -> None:
    """Queue live 16 kHz audio without blocking the event loop (``text``: a subtitle
    that starts with it).

    When the session's audio budget is full (a producer far ahead of real time),
    waits for room on a worker thread: the caller stops reading its source, which
    holds the producer back. Nothing is dropped unless an interrupt makes it stale.
    """
    if not len(pcm):
        return
    try:
        worker.put_audio(pcm, end_of_utterance=False, utterance=utterance, text=text)
    except SpeechQueueFull:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: worker.put_audio(pcm, end_of_utterance=False, block=True, utterance=utterance, text=text)
        )


class LiveUtterance:
    """One open streamed utterance: format, resampler, seq check, its number."""

    def __init__(self, worker: "BaseReal", fmt: StreamFormat, kind: str = "stream") -> None:
        self.worker = worker
        self.format = fmt
        self.id = worker.open_utterance(kind)
        self.resampler = StreamResampler(fmt.sample_rate)
        self.next_seq = 0
        self.told_interrupted = False
        self._primed = False

    @property
    def interrupted(self) -> bool:
        return self.worker.playback.is_finished(self.id)

    async def push(self, mono: np.ndarray) -> None:
        """Queue mono float32 audio at the declared rate.

        The resampler's output trails its input by its filter delay (~1 ms); the
        first push is padded by that much silence in front, so what has arrived is
        always available up to its end and a frame never waits a whole chunk more
        for its last millisecond.
        """
        out = self.resampler.process(mono)
        if not self._primed:
            self._primed = True
            short = round(len(mono) * SAMPLE_RATE / self.format.sample_rate) - len(out)
            if short > 0:
                out = np.concatenate([np.zeros(short, np.float32), out])
        await push_live(self.worker, out, self.id)

    async def end(self) -> None:
        """Queue the resampler's tail and close the utterance."""
        if not self.interrupted:
            await push_live(self.worker, self.resampler.flush(), self.id)
            self.worker.end_utterance(self.id)


class StreamIngest:
    """The per-socket state machine behind ``GET /ws`` (independent of aiohttp).

    ``reply(event)`` sends an event to this socket only (errors about its messages);
    ``ready()`` says whether the session's peer has connected (before that, speech is
    refused with an error: nothing would be rendered for anybody).
    """

    def __init__(self, worker: "BaseReal", reply: Callable[[dict[str, Any]], None],
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.worker = worker
        self.reply = reply
        self.ready = ready
        self.utterance: LiveUtterance | None = None

    def error(self, msg: str, seq: int | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "msg": msg}
        if seq is not None:
            event["seq"] = seq
        self.reply(event)

    async def on_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_BYTES:
            return self.error(f"control message of {len(text)} characters exceeds {MAX_TEXT_BYTES}")
        try:
            msg = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            return self.error(f"malformed JSON control message: {str(e)[:80]}")
        if not isinstance(msg, dict):
            return self.error("a control message must be a JSON object with a 'type'")
        kind = msg.get("type")
        if kind == "start":
            try:
                fmt = parse_start(msg)
            except ValueError as e:
                return self.error(f"bad start: {e}")
            if not self.ready():
                return self.error("the session's peer has not connected yet: start again once it has")
            await self.close_utterance()
            if fmt.interrupt:
                self.worker.interrupt()
            self.utterance = LiveUtterance(self.worker, fmt)
        elif kind == "end":
            if self.utterance is None:
                return self.error("'end' without an open utterance")
            await self.close_utterance()
        elif kind == "interrupt":
            self.utterance = None
            self.worker.interrupt()
        else:
            self.error(f"unknown message type {str(kind)[:40]!r}; expected start, end or interrupt")

    async def on_binary(self, data: bytes) -> None:
        utt = self.utterance
        if utt is None:
            return self.error("audio without an open utterance: send {\"type\": \"start\"} first; message dropped")
        seq = None
        payload: bytes | memoryview = data
        if utt.format.framing == "crc32":
            try:
                seq, payload = parse_frame(data)
            except FramingError as e:
                if e.seq == utt.next_seq:  # the expected message, corrupted: its seq is used up
                    utt.next_seq += 1
                return self.error(f"{e}; message dropped", e.seq)
            if seq < utt.next_seq:
                return self.error(f"seq {seq} repeats or goes back (expected {utt.next_seq}); message dropped", seq)
            if seq > utt.next_seq:  # a gap: say so, keep this message
                self.error(f"seq gap: expected {utt.next_seq}, got {seq} ({seq - utt.next_seq} messages missing)", seq)
            utt.next_seq = seq + 1
        if utt.interrupted:
            if not utt.told_interrupted:
                utt.told_interrupted = True
                self.error(f"utterance {utt.id} has finished (interrupted, or closed after {UTTERANCE_ABANDON_S:g} s "
                           "without audio): its further audio is dropped; send start for new speech", seq)
            return
        if len(payload) > utt.format.max_payload:
            return self.error(f"message carries more than {MAX_MESSAGE_S:g} s of audio; dropped", seq)
        try:
            mono = pcm_to_mono(bytes(payload), utt.format.format, utt.format.channels)
        except ValueError as e:
            return self.error(f"{e}; message dropped", seq)
        await utt.push(mono)

    async def close_utterance(self) -> None:
        """End the open utterance, if any (its audio plays out)."""
        utt, self.utterance = self.utterance, None
        if utt is not None:
            await utt.end()


async def websocket(request: web.Request, session: Any) -> web.WebSocketResponse:
    """``GET /ws?sessionid=``: live audio in, the session's events out (see module doc).

    ``session`` was looked up before the upgrade (an unknown id or a wrong token is
    answered 4xx there). The socket may open before the peer has connected; a
    ``start`` is refused with an ``error`` event until it has.
    """
    ws = web.WebSocketResponse(max_msg_size=MAX_BINARY_BYTES, heartbeat=WS_HEARTBEAT_S)
    await ws.prepare(request)
    sub = session.bus.subscribe()
    ingest = StreamIngest(session.worker, sub.put, ready=lambda: session.connected)

    async def send_events() -> None:
        async for event in sub:
            await ws.send_str(json.dumps(event))
        await ws.close(code=1001, message=b"session closed")

    sender = asyncio.ensure_future(send_events())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ingest.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ingest.on_binary(msg.data)
            elif msg.type == WSMsgType.ERROR:
                log.info("session %s: WebSocket error: %s", session.id[:8], ws.exception())
    finally:
        await ingest.close_utterance()  # a producer that leaves ends its utterance
        sub.close()
        sender.cancel()
    return ws


class MicrophoneIngest:
    """The peer's WebRTC audio track as live speech (``"mic": "lipsync"`` offers).

    aiortc decodes Opus to 48 kHz s16 frames of 20 ms. Each talk spurt (energy VAD,
    :data:`MIC_PREROLL_MS` before its onset, closed after :data:`MIC_HANGOVER_MS`
    below the threshold) is one utterance of kind "mic".
    """

    def __init__(self, worker: "BaseReal", track: Any, threshold_dbfs: float = VAD_THRESHOLD_DBFS) -> None:
        self.worker = worker
        self.track = track
        self.threshold_dbfs = threshold_dbfs
        self.utterance: LiveUtterance | None = None
        # The current frame and the MIC_PREROLL_MS before it (20 ms frames).
        self._preroll: deque[np.ndarray] = deque(maxlen=MIC_PREROLL_MS // CHUNK_MS + 1)
        self._quiet_ms = 0
        self._rate = 0

    async def run(self) -> None:
        """Consume the track until it ends; then close the open spurt."""
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await self.track.recv()
                await self.on_frame(frame_to_mono(frame), frame.sample_rate, frame.samples * 1000 // frame.sample_rate)
        except MediaStreamError:
            pass
        finally:
            if self.utterance is not None:
                await self.utterance.end()
                self.utterance = None

    async def on_frame(self, mono: np.ndarray, rate: int, ms: int) -> None:
        """One frame of mic audio (mono float32 at ``rate`` Hz, ``ms`` long)."""
        level = 20.0 * np.log10(float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))) + 1e-9)
        loud = level > self.threshold_dbfs
        if self.utterance is not None and (rate != self._rate or self.utterance.interrupted):
            await self.utterance.end()  # a barge-in cut the spurt, or the rate changed
            self.utterance = None
            self._preroll.clear()
        self._rate = rate
        if self.utterance is None:
            self._preroll.append(mono)
            if not loud:
                return
            self.utterance = LiveUtterance(self.worker, StreamFormat(sample_rate=rate), kind="mic")
            mono = np.concatenate(list(self._preroll))
            self._preroll.clear()
        self._quiet_ms = 0 if loud else self._quiet_ms + ms
        await self.utterance.push(mono)
        if self._quiet_ms >= MIC_HANGOVER_MS:
            await self.utterance.end()
            self.utterance = None


def frame_to_mono(frame: Any) -> np.ndarray:
    """An ``av.AudioFrame`` (s16 or flt, packed or planar) -> mono float32 (samples,)."""
    x = frame.to_ndarray()
    channels = len(frame.layout.channels) or 1
    x = x.reshape(-1, channels) if not frame.format.is_planar else x.reshape(channels, -1).T
    scale = 32768.0 if frame.format.name.startswith("s16") else 1.0
    return (x.mean(axis=1, dtype=np.float32) / np.float32(scale)).astype(np.float32, copy=False)
