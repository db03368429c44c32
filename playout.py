"""Playout buffer: assigns composited media units to session-clock slots.

The compositing thread puts :class:`MediaUnit` objects (one 40 ms video frame
paired with its two 20 ms audio chunks) into a bounded FIFO. Both tracks ask
:meth:`PlayoutBuffer.unit_for_slot` for the unit of a slot when that slot is due;
the first ask decides the slot, in slot order, and both tracks then get the same
unit, so a video frame and its audio always share one slot (and one pts).

When no unit is ready at a slot's due time, the slot is filled with an *idle* unit
(the avatar's idle loop frame and digital silence): speech is delayed, never lost
or sent in a burst. When that happens inside speech (a live producer is late),
the face eases from the last speech frame to the idle loop over
``UNDERRUN_FADE_SLOTS`` slots instead of snapping shut. A speech segment starts only once ``prebuffer`` units are
ready (or its final unit is), a small jitter buffer against producer hiccups.

Thread model: :meth:`put` is called from the compositing thread and blocks while
the buffer is full (backpressure up the pipeline); everything else runs on the
event loop and never blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from clock import FRAME_SAMPLES

# Slots over which the face cross-fades from the last speech frame to the idle loop
# after an underrun inside speech (3 x 40 ms, about the default model's mouth release).
UNDERRUN_FADE_SLOTS = 3


@dataclass
class MediaUnit:
    """One slot's media: a video frame and the 2 audio chunks that play with it.

    Attributes:
        video: the frame: BGR uint8 (H, W, 3), or I420 planes uint8 (H * 3 // 2, W).
        video_format: "bgr24" or "yuv420p" (PyAV format name of ``video``).
        audio: int16 (FRAME_SAMPLES,) = (640,) PCM at 16 kHz, mono.
        loop_index: avatar frame-loop index the frame was drawn from.
        speech: True when the unit carries user audio tagged as speech.
        epoch: interrupt epoch the unit belongs to (stale epochs are discarded).
        idle: True for units made up by the playout buffer (no user audio).
        final: True for the last unit of an utterance.
        utterance: the session's utterance number the audio belongs to (None: untracked).
        text: subtitle that starts playing with this unit, if any.
        t_in: monotonic time (s) the unit's audio entered the session.
        stamps: per-stage monotonic timestamps (s), for metrics.
    """

    video: np.ndarray
    audio: np.ndarray
    loop_index: int
    video_format: str = "bgr24"
    speech: bool = False
    epoch: int = 0
    idle: bool = False
    final: bool = False
    utterance: int | None = None
    text: str | None = None
    t_in: float = 0.0
    stamps: dict[str, float] = field(default_factory=dict)


SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)


class PlayoutBuffer:
    """Bounded FIFO of ready units plus the slot -> unit decisions.

    Args:
        idle_frame: ``loop_index -> frame`` for the idle avatar loop.
        idle_format: PyAV format name of the idle frames ("bgr24" or "yuv420p").
        loop_length: number of frames in the avatar loop.
        capacity: maximum number of queued units; :meth:`put` blocks beyond it.
        prebuffer: units that must be ready before a speech segment starts.
        history: how many past slot decisions to remember (tracks may ask for a
            slot a little after the other track did).
        on_underrun: called when an idle slot interrupts a speech segment.
    """

    def __init__(
        self,
        idle_frame: Callable[[int], np.ndarray],
        loop_length: int,
        idle_format: str = "bgr24",
        capacity: int = 50,
        prebuffer: int = 1,
        history: int = 25,
        on_underrun: Callable[[], None] | None = None,
    ) -> None:
        if capacity < 1 or prebuffer < 1:
            raise ValueError("capacity and prebuffer must be >= 1")
        self._idle_frame = idle_frame
        self._idle_format = idle_format
        self._loop_length = max(1, loop_length)
        self.capacity = capacity
        self.prebuffer = min(prebuffer, capacity)
        self._queue: deque[MediaUnit] = deque()
        self._cond = threading.Condition()
        self._decided: OrderedDict[int, MediaUnit] = OrderedDict()
        self._next_slot = 0
        self._history = history
        self._on_underrun = on_underrun
        self._playing = False  # inside a speech segment (no prebuffer wait)
        self._last_video: np.ndarray | None = None  # video of the last unit with user audio
        self._fade = 0  # idle slots left in the cross-fade after an underrun
        self._closed = False
        self._followers = threading.Condition()  # wakes readers waiting in wait_decided
        self.loop_pos = 0  # loop index of the next idle frame
        self.epoch = 0
        self.underruns = 0  # idle slots inserted inside a segment (producer late)

    # -- producer side (compositing thread) --------------------------------------
    def put(self, unit: MediaUnit, timeout: float | None = None) -> bool:
        """Queue ``unit``, blocking while the buffer is full.

        Returns False (unit discarded) when the unit's epoch is stale, the buffer
        was closed, or ``timeout`` (s) expired while full; True when queued.
        """
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or unit.epoch != self.epoch or len(self._queue) < self.capacity,
                timeout,
            )
            if not ok or self._closed or unit.epoch != self.epoch:
                return False
            self._queue.append(unit)
            return True

    def flush(self, epoch: int) -> int:
        """Drop every queued unit and move to ``epoch`` (an interrupt).

        Slots already decided keep their units (at most one slot is in flight at
        a track); the next undecided slot plays idle. Returns units dropped.
        """
        with self._cond:
            dropped = len(self._queue)
            self._queue.clear()
            self.epoch = epoch
            self._playing = False
            self._cond.notify_all()
        return dropped

    def close(self) -> None:
        """Wake and refuse producers; used at session teardown."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._decided.clear()  # a closed session's frames go now, whoever still holds the buffer
            self._last_video = None
            self._cond.notify_all()
        with self._followers:
            self._followers.notify_all()

    # -- consumer side (event loop) ------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def speaking(self) -> bool:
        """True when the latest slot the tracks asked for carries user audio (not idle)."""
        last = next(reversed(self._decided.values()), None) if self._decided else None
        return last is not None and not last.idle and last.epoch == self.epoch

    def unit_for_slot(self, slot: int) -> MediaUnit:
        """The unit that plays in ``slot``; decides all earlier slots first.

        Never blocks. A slot older than the remembered history gets an idle unit.
        """
        while self._next_slot <= slot:
            self._decide(self._next_slot)
        unit = self._decided.get(slot)
        if unit is None:  # asked far too late: history pruned
            unit = self._idle_unit(self.loop_pos)
        return unit

    # -- followers (any thread) ---------------------------------------------------
    # A follower (muxer.SlotFollower: the fMP4 stream, a recording) reads the units the
    # tracks decided, after them, and never decides a slot itself: the tracks' pacing
    # and the producer's queue stay theirs alone, whatever a follower does.
    @property
    def next_slot(self) -> int:
        """The first slot not decided yet (0 before the tracks started)."""
        return self._next_slot

    @property
    def closed(self) -> bool:
        return self._closed

    def decided(self, slot: int) -> MediaUnit | None:
        """The unit the tracks got for ``slot``; None if not decided yet or no longer
        in the history. Never decides anything; safe from any thread."""
        return self._decided.get(slot)

    def wait_decided(self, slot: int, timeout: float) -> bool:
        """Block (a follower's thread, never the loop) until ``slot`` is decided or the
        buffer is closed, at most ``timeout`` s. Returns True when it is decided."""
        with self._followers:
            self._followers.wait_for(lambda: self._next_slot > slot or self._closed, timeout)
        return self._next_slot > slot

    def _decide(self, slot: int) -> None:
        with self._cond:
            unit = None
            if self._queue and (
                self._playing or len(self._queue) >= self.prebuffer or any(u.final for u in self._queue)
            ):
                unit = self._queue.popleft()
                self._cond.notify_all()
            if unit is None:
                if self._playing:
                    self.underruns += 1
                    self._fade = UNDERRUN_FADE_SLOTS
                    if self._on_underrun is not None:
                        self._on_underrun()
                self._playing = False
                unit = self._make_idle()
                if self._fade:
                    unit.video = self._faded(unit)
            else:
                self._playing = not unit.final
                self._fade = 0
                self._last_video = unit.video if unit.video_format == self._idle_format else None
                self.loop_pos = (unit.loop_index + 1) % self._loop_length
        self._decided[slot] = unit
        self._next_slot = slot + 1
        while len(self._decided) > self._history:
            self._decided.popitem(last=False)
        with self._followers:
            self._followers.notify_all()

    def _faded(self, idle: MediaUnit) -> np.ndarray:
        """The idle frame mixed with the last speech frame, weight fading to 0."""
        w = self._fade / (UNDERRUN_FADE_SLOTS + 1)
        self._fade -= 1
        last = self._last_video
        if last is None or last.shape != idle.video.shape:
            return idle.video
        return cv2.addWeighted(last, w, idle.video, 1.0 - w, 0.0)

    def _make_idle(self) -> MediaUnit:
        index = self.loop_pos
        self.loop_pos = (index + 1) % self._loop_length
        return self._idle_unit(index)

    def _idle_unit(self, index: int) -> MediaUnit:
        video = self._idle_frame(index)
        return MediaUnit(video=video, audio=SILENCE, loop_index=index, video_format=self._idle_format, idle=True)
