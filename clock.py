"""The session clock: one time base shared by a session's audio and video tracks.

Every pts is derived from a count (of 20 ms audio chunks or of 40 ms video frames),
never from wall time, so the two tracks cannot drift apart: audio chunk ``k`` and
video frame ``k // AUDIO_CHUNKS_PER_FRAME`` always carry the same media time. Wall
time is used only to decide *when* a slot is due.

A *slot* is one 40 ms video frame interval; it carries exactly one video frame and
``AUDIO_CHUNKS_PER_FRAME`` (2) audio chunks.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Callable

# Audio: 16 kHz mono PCM in 20 ms chunks (Whisper's input rate; LiveTalking's `--fps 50`).
SAMPLE_RATE = 16000  # Hz
CHUNK_MS = 20
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_MS // 1000  # 320 samples
# Video: 25 fps, the frame rate MuseTalk's feature windows are defined for.
VIDEO_FPS = 25
FRAME_MS = 1000 // VIDEO_FPS  # 40 ms
AUDIO_CHUNKS_PER_FRAME = FRAME_MS // CHUNK_MS  # 2
FRAME_SAMPLES = CHUNK_SAMPLES * AUDIO_CHUNKS_PER_FRAME  # 640 samples
# RTP clock rates (RFC 3551 / RFC 7741): video 90 kHz; audio pts count 16 kHz samples.
VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = Fraction(1, SAMPLE_RATE)
VIDEO_PTS_PER_FRAME = VIDEO_CLOCK_RATE // VIDEO_FPS  # 3600
SLOT_DURATION = Fraction(FRAME_MS, 1000)  # seconds, exact
CHUNK_DURATION = Fraction(CHUNK_MS, 1000)  # seconds, exact


def video_pts(slot: int) -> int:
    """pts of video frame ``slot`` in ``VIDEO_TIME_BASE`` (1/90000 s)."""
    return slot * VIDEO_PTS_PER_FRAME


def audio_pts(chunk: int) -> int:
    """pts of audio chunk ``chunk`` in ``AUDIO_TIME_BASE`` (1/16000 s)."""
    return chunk * CHUNK_SAMPLES


def chunk_slot(chunk: int) -> int:
    """The slot (video frame index) that audio chunk ``chunk`` belongs to."""
    return chunk // AUDIO_CHUNKS_PER_FRAME


class SessionClock:
    """Maps slot and chunk indices to wall-clock due times for one session.

    The clock starts on the first call to :meth:`start` (the first ``recv`` of
    either track); slot 0 and chunk 0 are both due at that instant. Due times are
    computed from the start instant and an exact rational offset, so no rounding
    error accumulates over a long session.

    Args:
        time_fn: monotonic time source in seconds (injectable for tests).
    """

    def __init__(self, time_fn: Callable[[], float] = time.monotonic) -> None:
        self._time = time_fn
        self._t0: float | None = None

    @property
    def started(self) -> bool:
        return self._t0 is not None

    @property
    def t0(self) -> float:
        """Wall time (s) at which slot 0 was due. Raises RuntimeError before start."""
        if self._t0 is None:
            raise RuntimeError("session clock not started")
        return self._t0

    def now(self) -> float:
        return self._time()

    def start(self) -> float:
        """Start the clock if it is not running; returns the start instant (s)."""
        if self._t0 is None:
            self._t0 = self._time()
        return self._t0

    def slot_due(self, slot: int) -> float:
        """Wall time (s) at which video slot ``slot`` (and its first chunk) is due."""
        return self.t0 + float(slot * SLOT_DURATION)

    def chunk_due(self, chunk: int) -> float:
        """Wall time (s) at which audio chunk ``chunk`` is due."""
        return self.t0 + float(chunk * CHUNK_DURATION)

    def current_slot(self, now: float | None = None) -> int:
        """Index of the slot whose interval contains ``now`` (-1 before start)."""
        if self._t0 is None:
            return -1
        now = self._time() if now is None else now
        return int((Fraction(now - self._t0)) // SLOT_DURATION)
