"""Audio front end of a session: pushed PCM -> 20 ms chunks -> per-frame audio units.

The ASR thread owns the session's :class:`AudioInbox`. It cuts each utterance into
20 ms chunks of 16 kHz PCM, tags each chunk speech or silence (energy VAD with a
hangover), groups chunks in pairs (one pair per 40 ms video frame), computes the
model's audio features for speech frames once their right context (lookahead) is
available, and hands :class:`AudioUnit` objects to the inference thread through a
bounded :class:`StageQueue` (blocking put: backpressure, nothing dropped unless an
interrupt makes it stale).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import numpy as np

from clock import CHUNK_SAMPLES, FRAME_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)

T = TypeVar("T")

# Energy VAD: a 20 ms chunk is speech above this level. Speech recordings sit at
# -30..-10 dBFS RMS; room noise and dither well below -50 dBFS.
VAD_THRESHOLD_DBFS = -45.0
# Frames kept tagged as speech after the last speech chunk (VAD hangover), so the
# model can close the mouth smoothly instead of snapping to the idle frame.
VAD_HANGOVER_FRAMES = 3
# Most frames whose features are computed in one call (bounds the first frame's wait).
FEATURE_BATCH = 8
# An open utterance whose producer sent nothing for this long is closed, as if its end
# had come (a vanished producer). A live producer that is merely late keeps its
# utterance open: the playout plays idle slots meanwhile, and nothing it sends is lost.
UTTERANCE_ABANDON_S = 5.0


class SpeechQueueFull(RuntimeError):
    """Raised when pushed audio would exceed the session's buffered-audio budget."""


@dataclass
class AudioSegment:
    """A piece of pushed audio.

    Attributes:
        pcm: float32 (samples,) at 16 kHz mono in [-1, 1]; may be empty for a bare
            end-of-utterance mark.
        epoch: interrupt epoch it was pushed in.
        end_of_utterance: the utterance ends after this segment.
        utterance: the session's utterance number (``events.PlaybackTracker``), or
            None for audio outside the event bookkeeping (tests, benchmarks).
        text: a subtitle that starts with this segment's first sample (a /human sentence).
        t_in: monotonic time (s) the audio entered the session.
    """

    pcm: np.ndarray
    epoch: int
    end_of_utterance: bool = True
    utterance: int | None = None
    text: str | None = None
    t_in: float = field(default_factory=time.monotonic)


@dataclass
class AudioUnit:
    """One video frame's audio: 2 chunks (640 samples), tag and model features.

    Attributes:
        pcm: float32 (640,) 16 kHz audio of the frame.
        chunk_speech: bool (2,) speech tag per 20 ms chunk.
        speech: the frame needs a model call (speech, or inside the VAD hangover).
        features: model features (shape model-defined) or None for silence.
        loop_index: avatar loop frame to draw on.
        index: frame index within the utterance.
        epoch: interrupt epoch.
        final: last frame of its utterance.
        utterance: the session's utterance number (None: not tracked).
        text: subtitle starting in this frame (a /human sentence), if any.
        t_in: monotonic time (s) the audio entered the session.
        stamps: per-stage monotonic timestamps (s).
    """

    pcm: np.ndarray
    chunk_speech: np.ndarray
    speech: bool
    features: np.ndarray | None
    loop_index: int
    index: int
    epoch: int
    final: bool = False
    utterance: int | None = None
    text: str | None = None
    t_in: float = 0.0
    stamps: dict[str, float] = field(default_factory=dict)


def chunk_levels_dbfs(pcm: np.ndarray) -> np.ndarray:
    """RMS level in dBFS of each 20 ms chunk of ``pcm`` (float32, length a multiple of 320)."""
    chunks = pcm.reshape(-1, CHUNK_SAMPLES).astype(np.float64)
    rms = np.sqrt(np.mean(chunks * chunks, axis=1))
    return 20.0 * np.log10(rms + 1e-9)


class StageQueue(Generic[T]):
    """Bounded FIFO between two pipeline threads.

    Policy when full: :meth:`put` blocks (backpressure) until there is room, the
    item turns stale (``is_stale()``, e.g. an interrupt bumped the epoch), or the
    queue is closed; stale items are dropped, never queued. :meth:`clear`
    empties the queue atomically and wakes blocked producers.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, is_stale: Callable[[], bool] = lambda: False, poll: float = 0.1) -> bool:
        """Queue ``item``; returns False if it was dropped as stale or the queue closed."""
        with self._cond:
            while not self._closed and not is_stale() and len(self._items) >= self.maxsize:
                self._cond.wait(poll)
            if self._closed or is_stale():
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """Next item, or None after ``timeout`` (s) with nothing queued or when closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self) -> T | None:
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def clear(self) -> int:
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self._cond.notify_all()
            return n

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


class AudioInbox:
    """A session's queue of pushed audio, bounded by total buffered duration.

    Args:
        max_seconds: most audio (s) that may wait here; a push beyond it raises
            :class:`SpeechQueueFull` (``block=False``) or waits for room.
    """

    def __init__(self, max_seconds: float) -> None:
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self._queue: StageQueue[AudioSegment] = StageQueue(maxsize=1 << 30)
        self._samples = 0
        self._lock = threading.Condition()

    @property
    def pending_samples(self) -> int:
        return self._samples

    def put(self, segment: AudioSegment, block: bool = False, is_stale: Callable[[], bool] = lambda: False) -> bool:
        """Queue ``segment``.

        Raises:
            SpeechQueueFull: ``block`` is False and the budget would be exceeded.
            ValueError: a single segment longer than the whole budget.
        Returns False when a blocking put was abandoned because it turned stale.
        """
        n = len(segment.pcm)
        if n > self.max_samples:
            raise ValueError(
                f"audio of {n / SAMPLE_RATE:.1f} s exceeds the session's buffer of {self.max_samples / SAMPLE_RATE:.0f} s"
            )
        with self._lock:
            while self._samples + n > self.max_samples:
                if not block:
                    raise SpeechQueueFull(
                        f"speech queue full: {self._samples / SAMPLE_RATE:.1f} s already queued, "
                        f"limit {self.max_samples / SAMPLE_RATE:.0f} s"
                    )
                if is_stale():
                    return False
                self._lock.wait(0.1)
            self._samples += n
        self._queue.put(segment)
        return True

    def get(self, timeout: float) -> AudioSegment | None:
        segment = self._queue.get(timeout)
        if segment is not None:
            with self._lock:
                self._samples -= len(segment.pcm)
                self._lock.notify_all()
        return segment

    def clear(self) -> int:
        """Drop everything queued; returns the samples dropped."""
        with self._lock:
            self._queue.clear()
            dropped, self._samples = self._samples, 0
            self._lock.notify_all()
        return dropped

    def close(self) -> None:
        self._queue.close()
        with self._lock:
            self._lock.notify_all()


class BaseASR(threading.Thread):
    """The ASR thread: inbox -> :class:`AudioUnit` stream for the inference thread.

    Args:
        features: ``window -> features``; ``window`` is float32 covering
            ``[frame_start - lookbehind, frame_end + lookahead)`` at 16 kHz (None
            for subclasses that override :meth:`compute_features`).
        lookbehind_chunks / lookahead_chunks: feature context in 20 ms chunks.
        out_queue: bounded queue to the inference thread.
        epoch: callable returning the session's current interrupt epoch.
        loop_hint: callable returning the avatar loop index an utterance starting
            now should begin on.
        stop_event: set to end the thread.
        vad_threshold_dbfs, hangover_frames: speech tagging (see module constants).
    """

    def __init__(
        self,
        features: Callable[[np.ndarray], np.ndarray] | None,
        lookbehind_chunks: int,
        lookahead_chunks: int,
        out_queue: StageQueue[AudioUnit],
        inbox: AudioInbox,
        epoch: Callable[[], int],
        loop_hint: Callable[[], int],
        stop_event: threading.Event,
        vad_threshold_dbfs: float = VAD_THRESHOLD_DBFS,
        hangover_frames: int = VAD_HANGOVER_FRAMES,
        name: str = "asr",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.features = features
        self.lookbehind = lookbehind_chunks * CHUNK_SAMPLES
        self.lookahead = lookahead_chunks * CHUNK_SAMPLES
        self.out_queue = out_queue
        self.inbox = inbox
        self._epoch = epoch
        self._loop_hint = loop_hint
        self._stop_event = stop_event
        self.vad_threshold = vad_threshold_dbfs
        self.hangover = hangover_frames
        self.feature_batch = FEATURE_BATCH
        self.busy = False  # holds audio of an unfinished utterance
        self._reset_utterance(-1)

    # -- utterance state -------------------------------------------------------
    def _reset_utterance(self, epoch: int) -> None:
        self._buf = np.zeros(0, dtype=np.float32)  # samples from frame_start - lookbehind
        self._frame = 0  # index of the next frame to emit
        self._since_speech = self.hangover + 1
        self._epoch_seen = epoch
        self._loop_start = 0
        self._t_in = 0.0
        self._last_input = 0.0
        self._utterance: int | None = None
        self._marks: deque[tuple[int, str]] = deque()  # (utterance sample offset, subtitle)
        self._samples = 0  # utterance samples appended to _buf so far
        self.busy = False

    def _stale(self) -> bool:
        return self._epoch() != self._epoch_seen or self._stop_event.is_set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            segment = self.inbox.get(timeout=0.05)
            if self._epoch() != self._epoch_seen:
                self._reset_utterance(self._epoch())
            if segment is None:
                if self.busy and time.monotonic() - self._last_input > UTTERANCE_ABANDON_S:
                    self._emit(flush=True)
                continue
            if segment.epoch != self._epoch_seen:
                continue
            if self.busy and segment.utterance != self._utterance:
                self._emit(flush=True)  # a new utterance closes the one still open
                if self._stale():
                    continue
            if not self.busy:  # a new utterance
                self._buf = np.zeros(self.lookbehind, dtype=np.float32)
                self._frame = 0
                self._loop_start = self._loop_hint()
                self._utterance = segment.utterance
                self.busy = True
            self._t_in = segment.t_in  # frames emitted from here on are this segment's
            self._last_input = time.monotonic()
            if segment.text:
                self._marks.append((self._samples, segment.text))
            self._samples += len(segment.pcm)
            self._buf = np.concatenate([self._buf, segment.pcm.astype(np.float32, copy=False)])
            self._emit(flush=segment.end_of_utterance)

    def compute_features(self, windows: list[np.ndarray], indices: list[int]) -> list[np.ndarray]:
        """Features of speech frames, in frame order, at most ``feature_batch`` per call.

        Args:
            windows: each frame's context window (float32, lookbehind + 640 +
                lookahead samples); consecutive frames' windows are 640 samples apart.
            indices: each frame's index in its utterance (silent frames in between
                are left out, so runs can have gaps).
        Override to batch the work, e.g. one audio-encoder pass per run of
        consecutive frames (``museasr.MuseASR``).
        """
        return [self.features(w) for w in windows]

    def _subtitle(self, frame: int) -> str | None:
        """Subtitles whose first sample falls in utterance frame ``frame`` (or before)."""
        texts = []
        while self._marks and self._marks[0][0] < (frame + 1) * FRAME_SAMPLES:
            texts.append(self._marks.popleft()[1])
        return " ".join(texts) or None

    def _emit(self, flush: bool) -> None:
        """Emit every frame whose lookahead is available; on ``flush`` pad and close."""
        if flush:
            body = len(self._buf) - self.lookbehind
            frames = -(-max(body, 0) // FRAME_SAMPLES) + 1  # +1: a trailing silent final frame
            need = self.lookbehind + frames * FRAME_SAMPLES + self.lookahead
            self._buf = np.pad(self._buf, (0, max(0, need - len(self._buf))))
        span = self.lookbehind + FRAME_SAMPLES + self.lookahead
        while len(self._buf) >= span and not self._stale():
            n = min(self.feature_batch, (len(self._buf) - span) // FRAME_SAMPLES + 1)
            last_group = len(self._buf) - n * FRAME_SAMPLES < span
            units, speech_windows = [], []
            for i in range(n):
                window = self._buf[i * FRAME_SAMPLES : i * FRAME_SAMPLES + span]
                levels = chunk_levels_dbfs(window[self.lookbehind :])  # frame + lookahead chunks
                if np.any(levels > self.vad_threshold):  # this frame or its lookahead
                    self._since_speech = 0
                else:
                    self._since_speech += 1
                unit = AudioUnit(
                    pcm=window[self.lookbehind : self.lookbehind + FRAME_SAMPLES].copy(),
                    chunk_speech=levels[:2] > self.vad_threshold,
                    speech=self._since_speech <= self.hangover,
                    features=None,
                    loop_index=self._loop_start + self._frame + i,
                    index=self._frame + i,
                    epoch=self._epoch_seen,
                    final=flush and last_group and i == n - 1,
                    utterance=self._utterance,
                    text=self._subtitle(self._frame + i),
                    t_in=self._t_in,
                )
                units.append(unit)
                if unit.speech:
                    speech_windows.append((unit, window))
            if speech_windows:
                features = self.compute_features([w for _, w in speech_windows], [u.index for u, _ in speech_windows])
                for (unit, _), f in zip(speech_windows, features):
                    unit.features = f
            now = time.monotonic()
            for unit in units:
                unit.stamps["features"] = now
                if not self.out_queue.put(unit, is_stale=self._stale):
                    return
            self._buf = self._buf[n * FRAME_SAMPLES :]
            self._frame += n
        if flush:
            self._reset_utterance(self._epoch_seen)
