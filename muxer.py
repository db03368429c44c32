"""A session's media, as its tracks sent it, muxed into MP4 with PyAV in a thread.

:class:`SlotFollower` reads the session's :class:`playout.PlayoutBuffer` slot by slot
*after* the WebRTC tracks decided each slot (``PlayoutBuffer.wait_decided`` /
``decided``): it gets the very :class:`playout.MediaUnit` the tracks sent, on the
session's one clock, and never decides a slot itself, so any number of followers
change nothing for the tracks. :class:`MP4Muxer` encodes those units (H.264 with
libx264 ``ultrafast``/``zerolatency``, a keyframe every second; AAC) and muxes a
fragmented MP4 (``frag_keyframe+empty_moov+default_base_moof``, ~100 ms fragments)
into any binary sink: a bounded :class:`ByteChannel` to an HTTP response
(``fmp4.py``) or a file (``record.py``).

Timeline: slot ``s`` of the session is video frame ``s - first`` (1/25 s) and audio
samples ``(s - first) * 640`` (16 kHz) of the file, where ``first`` is the slot the
follower started at; so a video frame and its audio keep their pairing exactly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from fractions import Fraction
from typing import IO, TYPE_CHECKING, Callable, Iterator

import av
import numpy as np

from clock import FRAME_SAMPLES, SAMPLE_RATE, VIDEO_FPS
from playout import SILENCE

if TYPE_CHECKING:
    from playout import MediaUnit, PlayoutBuffer

log = logging.getLogger(__name__)

# One keyframe a second (the "keyframe every second" at the session's 25 fps).
KEYFRAME_INTERVAL = VIDEO_FPS
# Fragment length (movenc's frag_duration, in us): ~100 ms fragments, each flushed
# at once (flush_packets) so a reader gets media ~100 ms after it was sent.
FRAGMENT_US = 100_000
FMP4_FLAGS = "frag_keyframe+empty_moov+default_base_moof"
AUDIO_RATE = 48000  # Hz: AAC at Opus's rate, like the WebRTC audio track (1024-sample frames = 21 ms)
AUDIO_BITRATE = 64000  # bit/s, mono speech
X264_CRF = "23"  # libx264's default quality
WAIT_SLICE_S = 0.5  # a follower re-checks its stop flag this often while no slot is decided


class SlotFollower:
    """Yields ``(slot, unit, audible)`` for consecutive slots as the tracks decide them.

    Runs in the caller's thread (a mux thread); blocks in ``wait_decided``. A slot
    that fell out of the playout's history before it was read (the follower lagged
    more than ~1 s) is skipped: the follower jumps to the oldest slot still kept and
    counts the skipped slots in :attr:`skipped`.

    Args:
        playout: the session's playout buffer.
        start: first slot to yield (default: the next slot the tracks will decide).
        stop: set to end the iteration (checked every WAIT_SLICE_S at least).
        end_slot: optional callable giving the first slot *not* to yield (None: no end yet).
    """

    def __init__(self, playout: "PlayoutBuffer", stop: threading.Event, start: int | None = None,
                 end_slot: Callable[[], int | None] | None = None) -> None:
        self.playout = playout
        self.stop = stop
        self.start = playout.next_slot if start is None else start
        self.end_slot = end_slot or (lambda: None)
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[int, "MediaUnit", bool]]:
        slot = self.start
        while not self.stop.is_set():
            end = self.end_slot()
            if end is not None and slot >= end:
                return
            if not self.playout.wait_decided(slot, WAIT_SLICE_S):
                if self.playout.closed:
                    return
                continue
            unit = self.playout.decided(slot)
            if unit is None:
                if self.playout.closed:
                    return
                oldest = self.playout.next_slot - 1
                while oldest > slot and self.playout.decided(oldest - 1) is not None:
                    oldest -= 1
                self.skipped += oldest - slot
                slot = oldest
                continue
            # As the audio track: a unit of an interrupted epoch plays as silence.
            yield slot, unit, unit.epoch == self.playout.epoch
            slot += 1


class Muxer:
    """Encodes media units (H.264 + AAC) into a container written to ``sink``.

    Not thread-safe: one thread calls :meth:`add` and :meth:`close`. The container is
    opened at the first unit (its frame size fixes the video stream's). Subclasses
    give the container format and its options.

    Args:
        sink: a binary file-like object with ``write(bytes)`` (PyAV writes through it;
            an exception raised by ``write`` ends the muxing, surfacing from :meth:`add`),
            or a URL FFmpeg opens itself (``rtmp://``).
        crf: libx264 constant rate factor (string).

    Raises (from add/close): ``av.FFmpegError`` or ``OSError`` on encoder or write errors.
    """

    format = ""

    def __init__(self, sink: "IO[bytes] | str", crf: str = X264_CRF) -> None:
        self.sink = sink
        self.crf = crf
        self.container: av.container.OutputContainer | None = None
        self.first_slot: int | None = None
        self.frames = 0  # video frames added
        self._video = None
        self._audio = None
        self._size: tuple[int, int] | None = None

    def container_options(self) -> dict[str, str]:
        return {}

    def _open(self, width: int, height: int) -> None:
        self.container = av.open(self.sink, mode="w", format=self.format, container_options=self.container_options())
        v = self.container.add_stream("libx264", rate=VIDEO_FPS)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.time_base = Fraction(1, VIDEO_FPS)
        v.codec_context.gop_size = KEYFRAME_INTERVAL
        v.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": self.crf,
                                   "x264-params": f"keyint={KEYFRAME_INTERVAL}:min-keyint={KEYFRAME_INTERVAL}:scenecut=0"}
        v.thread_count = 2
        a = self.container.add_stream("aac", rate=AUDIO_RATE)
        a.layout = "mono"
        a.bit_rate = AUDIO_BITRATE
        self._video, self._audio = v, a
        self._size = (width, height)

    def add(self, slot: int, unit: "MediaUnit", audible: bool = True) -> None:
        """Encode and mux one slot: its video frame and its 640 audio samples (16 kHz)."""
        frame = av.VideoFrame.from_ndarray(unit.video, format=unit.video_format)
        if self.container is None:
            self._open(frame.width - frame.width % 2, frame.height - frame.height % 2)
            self.first_slot = slot
        assert self._size is not None and self.first_slot is not None
        if (frame.width, frame.height) != self._size or frame.format.name != "yuv420p":
            frame = frame.reformat(width=self._size[0], height=self._size[1], format="yuv420p")
        index = slot - self.first_slot
        frame.pts = index
        frame.time_base = Fraction(1, VIDEO_FPS)
        samples = unit.audio if audible else SILENCE
        sound = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.int16).reshape(1, -1),
                                           format="s16", layout="mono")
        sound.sample_rate = SAMPLE_RATE
        sound.pts = index * FRAME_SAMPLES
        sound.time_base = Fraction(1, SAMPLE_RATE)
        self.container.mux(self._video.encode(frame))
        self.container.mux(self._audio.encode(sound))
        self.frames += 1

    @property
    def duration(self) -> float:
        """Seconds of media added so far."""
        return self.frames / VIDEO_FPS

    def close(self) -> None:
        """Flush the encoders and finish the file (idempotent). Raises as :meth:`add`."""
        container, self.container = self.container, None
        if container is None:
            return
        try:
            container.mux(self._video.encode(None))
            container.mux(self._audio.encode(None))
        finally:
            container.close()


class MP4Muxer(Muxer):
    """Fragmented MP4 (``frag_keyframe+empty_moov+default_base_moof``): fragments of
    ``fragment_us`` flushed to the sink as soon as they close.

    Args:
        sink, crf: as :class:`Muxer`.
        fragment_us: target fragment duration (us; movenc's ``frag_duration``).
    """

    format = "mp4"

    def __init__(self, sink: "IO[bytes] | str", fragment_us: int = FRAGMENT_US, crf: str = X264_CRF) -> None:
        super().__init__(sink, crf)
        self.fragment_us = fragment_us

    def container_options(self) -> dict[str, str]:
        return {"movflags": FMP4_FLAGS, "frag_duration": str(self.fragment_us), "flush_packets": "1"}


class FLVMuxer(Muxer):
    """FLV (H.264 + AAC), e.g. to an ``rtmp://`` URL: FFmpeg's RTMP client publishes it.

    Args:
        sink, crf: as :class:`Muxer`.
        timeout_s: a connect, read or write of the URL that takes longer fails
            (FFmpeg's ``rw_timeout``), so an unreachable server is an error, not a hang.
    """

    format = "flv"

    def __init__(self, sink: "IO[bytes] | str", timeout_s: float = 5.0, crf: str = X264_CRF) -> None:
        super().__init__(sink, crf)
        self.timeout_s = timeout_s

    def container_options(self) -> dict[str, str]:
        return {"flvflags": "no_duration_filesize", "rw_timeout": str(int(self.timeout_s * 1e6))}


class ChannelClosed(BrokenPipeError):
    """The reader of a :class:`ByteChannel` is gone or was dropped."""


class ByteChannel:
    """Bounded hand-over of bytes from a mux thread to a coroutine on the event loop.

    Policy when full: the *reader is dropped*: a :meth:`write` that would hold more than
    ``max_bytes`` unread closes the channel and raises :class:`ChannelClosed` (the mux
    thread ends; the HTTP handler ends the response), and :attr:`overflowed` is set.
    The writer never waits, so a slow HTTP client cannot slow the mux thread, the
    session or its WebRTC peer. A player that is dropped reconnects and gets a fresh
    stream starting at a keyframe.

    Args:
        loop: the loop the reader runs on.
        max_bytes: most bytes held unread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int) -> None:
        self._loop = loop
        self.max_bytes = max_bytes
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self.closed = False
        self.overflowed = False
        self.written = 0  # bytes accepted in all

    # -- writer side (mux thread): a file-like sink for PyAV ------------------------
    def write(self, data) -> int:
        data = bytes(data)
        with self._lock:
            if self.closed:
                raise ChannelClosed("stream reader gone")
            if self._held + len(data) > self.max_bytes:
                self.closed = self.overflowed = True
                self._chunks.clear()
                self._wake()
                raise ChannelClosed(f"stream reader more than {self.max_bytes} bytes behind: dropped")
            was_empty = not self._chunks
            self._chunks.append(data)
            self._held += len(data)
            self.written += len(data)
        if was_empty:
            self._wake()
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """No more data will come (end of stream): the reader drains then gets b""."""
        with self._lock:
            self.closed = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop closed (server shutting down)
            pass

    # -- reader side (event loop) -------------------------------------------------------
    async def read(self) -> bytes:
        """All bytes pending (joined), waiting for some; b"" at the end of the stream."""
        while True:
            with self._lock:
                if self._chunks:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    self._held = 0
                    return data
                if self.closed:
                    return b""
                self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """The reader is gone: later writes raise :class:`ChannelClosed`."""
        with self._lock:
            self.closed = True
            self._chunks.clear()
            self._held = 0
