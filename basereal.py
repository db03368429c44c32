"""The session worker: TTS, ASR, inference and compositing threads of one session.

Data flow (each arrow a bounded queue; a full queue blocks its producer, so the
whole pipeline is paced by the playout, and an interrupt bumps the session's
*epoch* so every stage drops what it holds)::

    /human text -> [tts queue] -> TTS thread --\
    /humanaudio PCM --------------------------> [AudioInbox] -> ASR thread
        -> [AudioUnit queue] -> inference thread (progressive batches)
        -> [(AudioUnit, FacePatch)] queue -> compositing thread
        -> PlayoutBuffer -> session clock -> audio + video tracks (webrtc.py)

Silence costs no model call: silent frames go straight to the compositor as
idle frames (mouth closed).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from avatar import to_i420
from baseasr import AudioInbox, AudioSegment, AudioUnit, BaseASR, SpeechQueueFull, StageQueue
from clock import SAMPLE_RATE, SessionClock
from events import PlaybackTracker
from tts import split_sentences
from metrics import SessionMetrics
from playout import MediaUnit, PlayoutBuffer

log = logging.getLogger(__name__)

__all__ = ["LipSyncModel", "SessionOptions", "BaseReal", "SpeechQueueFull", "TextQueueFull"]


class TextQueueFull(RuntimeError):
    """Raised when a session already has the maximum number of texts waiting for TTS."""


class LipSyncModel(abc.ABC):
    """What the session worker needs from a lip-sync model (see docs/contracts.md).

    Attributes:
        name: short model name for logs and status.
        lookbehind_chunks: audio context before a frame (20 ms chunks).
        lookahead_chunks: audio needed after a frame's end (20 ms chunks): the
            model's algorithmic latency.
    """

    name: str = "model"
    lookbehind_chunks: int = 0
    lookahead_chunks: int = 0

    def features(self, window: np.ndarray) -> np.ndarray:
        """Audio features of one frame from its float32 16 kHz context window
        (used by the default :meth:`make_asr`; models that build their own ASR
        thread need not implement it)."""
        raise NotImplementedError(f"{type(self).__name__} computes features in its own ASR thread (make_asr)")

    @abc.abstractmethod
    def infer(self, features: np.ndarray, loop_indices: Sequence[int]) -> list[Any]:
        """Render a batch of consecutive speech frames: one FacePatch (or None) each."""

    def reset(self) -> None:
        """Forget smoothing state (after silence and on interrupt)."""

    def make_asr(self, **kwargs: Any) -> BaseASR:
        """The session's ASR thread for this model; ``kwargs`` are BaseASR's queue,
        inbox, epoch, loop-hint, stop-event and name arguments. Models with their own
        feature extractor (MuseTalk: ``museasr.MuseASR``) override this."""
        return BaseASR(
            features=self.features,
            lookbehind_chunks=self.lookbehind_chunks,
            lookahead_chunks=self.lookahead_chunks,
            **kwargs,
        )


@dataclass
class SessionOptions:
    """Per-session pipeline settings (filled from the latency preset and CLI).

    Attributes:
        batch_size: largest inference batch (frames).
        min_batch: frames gathered before the first model call of a stretch.
        prebuffer: frames ready before a speech segment starts playing.
        playout_capacity: composited frames buffered ahead of the clock.
        drop_threshold_ms: a video frame later than this is skipped, not sent.
        max_audio_seconds: pushed audio a session may have waiting.
        max_texts: texts a session may have waiting for TTS.
    """

    batch_size: int = 4
    min_batch: int = 1
    prebuffer: int = 2
    playout_capacity: int = 50
    drop_threshold_ms: int = 40
    max_audio_seconds: float = 120.0
    max_texts: int = 32


class BaseReal:
    """One session's worker threads and state.

    Args:
        session_id: the session's id (for logs and metrics).
        model: the session's :class:`LipSyncModel` instance.
        avatar: the prepared avatar (``avatar.Avatar``): frame loop + compositing.
        options: pipeline settings.
        metrics: the session's metric children.
        tts: a ``tts.TTS`` for ``say`` (None: text input unsupported).
        publish: where the session's playback events go (``events.EventBus.publish``;
            None: nowhere).
    """

    def __init__(
        self,
        session_id: str,
        model: LipSyncModel,
        avatar: Any,
        options: SessionOptions,
        metrics: SessionMetrics,
        tts: Any = None,
        publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.model = model
        self.avatar = avatar
        self.options = options
        self.metrics = metrics
        self.tts = tts
        self.voice: str | None = None  # the session's TTS voice (None: the engine's default)
        self.clock = SessionClock()
        self._publish = publish or (lambda event: None)
        self.playback = PlaybackTracker(self._publish)
        self.epoch = 0
        self._epoch_lock = threading.Lock()
        self._stop = threading.Event()
        self.playout = PlayoutBuffer(
            idle_frame=avatar.frame_i420,
            loop_length=len(avatar),
            idle_format="yuv420p",
            capacity=options.playout_capacity,
            prebuffer=options.prebuffer,
            on_underrun=metrics.underrun,
        )
        self.inbox = AudioInbox(options.max_audio_seconds)
        # (epoch, utterance, text, voice)
        self.text_queue: StageQueue[tuple[int, int, str, str | None]] = StageQueue(options.max_texts)
        self.unit_queue: StageQueue[AudioUnit] = StageQueue(max(2 * options.batch_size, 4))
        self.composite_queue: StageQueue[tuple[AudioUnit, Any]] = StageQueue(max(2 * options.batch_size, 4))
        self.asr = model.make_asr(
            out_queue=self.unit_queue,
            inbox=self.inbox,
            epoch=lambda: self.epoch,
            loop_hint=self._loop_hint,
            stop_event=self._stop,
            name=f"asr-{session_id[:8]}",
        )
        self._threads = [
            self.asr,
            threading.Thread(target=self._inference_loop, name=f"infer-{session_id[:8]}", daemon=True),
            threading.Thread(target=self._composite_loop, name=f"composite-{session_id[:8]}", daemon=True),
            threading.Thread(target=self._tts_loop, name=f"tts-{session_id[:8]}", daemon=True),
        ]

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread and wait for them (blocking: call off the event loop)."""
        self._stop.set()
        for q in (self.text_queue, self.unit_queue, self.composite_queue):
            q.close()
        self.inbox.close()
        self.playout.close()
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)
        # The ASR thread holds callbacks bound to this worker (epoch, loop hint): a
        # reference cycle that only the cyclic GC's rare full collections break, which
        # kept a closed session's frames (~0.4 MB each, up to the playout history) alive
        # for many sessions. Cut it once the thread has ended.
        if not self.asr.is_alive():
            self.asr._epoch = self.asr._loop_hint = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- input --------------------------------------------------------------------
    def open_utterance(self, kind: str, text: str = "") -> int:
        """Number a new utterance for the playback events; returns its id.

        ``kind``: "text", "audio", "stream" or "mic"; ``text``: what it says, if known.
        """
        return self.playback.open(kind, text)

    def put_audio(
        self,
        pcm: np.ndarray,
        end_of_utterance: bool = True,
        block: bool = False,
        utterance: int | None = None,
        text: str | None = None,
    ) -> bool:
        """Queue float32 16 kHz mono PCM to be spoken, as part of ``utterance``.

        A new utterance number closes the one the ASR still holds open. ``text``: a
        subtitle that starts with this audio. Returns False when a blocking put was
        abandoned because an interrupt made it stale.

        Raises:
            SpeechQueueFull: the session's audio budget is exhausted (non-blocking).
            ValueError: empty audio, or longer than the whole budget.
        """
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            raise ValueError("audio is empty")
        return self._put(pcm, self.epoch, end_of_utterance, block, utterance, text)

    def end_utterance(self, utterance: int) -> None:
        """Close ``utterance``: what was pushed plays out, then ``playback_finished``."""
        self._put(np.zeros(0, np.float32), self.epoch, True, False, utterance, None)

    def _put(self, pcm: np.ndarray, epoch: int, end: bool, block: bool, utterance: int | None, text: str | None) -> bool:
        queued = self.inbox.put(
            AudioSegment(pcm=pcm, epoch=epoch, end_of_utterance=end, utterance=utterance, text=text),
            block=block,
            is_stale=lambda: self.epoch != epoch or self._stop.is_set(),
        )
        if queued and utterance is not None:
            self.playback.add_samples(utterance, len(pcm))
        return queued

    def say(self, text: str, voice: str | None = None) -> int:
        """Queue ``text`` for TTS in ``voice`` (None: the engine's default; check it
        first with ``tts.check_voice``); returns its utterance number.

        Raises TextQueueFull, or RuntimeError without TTS.
        """
        if self.tts is None:
            raise RuntimeError("no TTS engine is configured for this server")
        if len(self.text_queue) >= self.text_queue.maxsize:
            raise TextQueueFull(f"too many texts waiting ({self.text_queue.maxsize}); interrupt or retry later")
        utterance = self.open_utterance("text", text)
        self.text_queue.put((self.epoch, utterance, text, voice or self.voice))
        return utterance

    def interrupt(self) -> None:
        """Stop speaking now: flush every stage; the next slot plays idle."""
        with self._epoch_lock:
            self.epoch += 1
            epoch = self.epoch
        self.text_queue.clear()
        self.inbox.clear()
        self.unit_queue.clear()
        self.composite_queue.clear()
        self.playout.flush(epoch)
        self.playback.interrupt()
        self.metrics.interrupted()

    def is_speaking(self) -> bool:
        """True while the tracks send user audio, or an utterance they started has not
        finished (a live producer that is late gets idle slots, not an end)."""
        return self.playout.speaking or self.playback.speaking

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "speaking": self.is_speaking(),
            "queued_audio_s": self.inbox.pending_samples / SAMPLE_RATE,
            "playout_queued": self.playout.queued,
            "underruns": self.playout.underruns,
            "last_start_latency_ms": self.playback.last_start_latency_ms,
            **self.metrics.summary(),
        }

    # -- threads ------------------------------------------------------------------
    def _loop_hint(self) -> int:
        """Loop index a new utterance should start on: where playout will be by then."""
        in_flight = len(self.unit_queue) + len(self.composite_queue) + self.playout.queued
        return self.playout.loop_pos + in_flight + self.options.prebuffer

    def _tts_loop(self) -> None:
        while not self._stop.is_set():
            item = self.text_queue.get(timeout=0.1)
            if item is None:
                continue
            epoch, utterance, text, voice = item
            if epoch != self.epoch:
                continue
            try:
                for sentence in split_sentences(text):
                    # each piece is queued the moment the engine has it (online engines
                    # stream); the sentence's subtitle starts with its first piece
                    subtitle: str | None = sentence
                    for pcm in self.tts.stream_chunks(sentence, voice=voice):
                        if epoch != self.epoch or self._stop.is_set():
                            break
                        if len(pcm):
                            self._put(pcm, epoch, False, True, utterance, subtitle)
                            subtitle = None
                    if epoch != self.epoch or self._stop.is_set():
                        break
            except Exception as e:  # a TTS failure must not kill the session
                log.exception("session %s: TTS failed for %r", self.session_id[:8], text[:60])
                self._publish({"type": "error", "msg": f"speech synthesis failed: {e}", "utterance": utterance})
            finally:
                if epoch == self.epoch and not self._stop.is_set():
                    self._put(np.zeros(0, np.float32), epoch, True, False, utterance, None)

    def _inference_loop(self) -> None:
        carry: AudioUnit | None = None
        silent = True
        while not self._stop.is_set():
            unit = carry or self.unit_queue.get(timeout=0.1)
            carry = None
            if unit is None:
                continue
            if unit.epoch != self.epoch:
                silent = True
                self.model.reset()
                continue
            if not unit.speech:
                if not silent:
                    self.model.reset()
                    silent = True
                self._to_compositor(unit, None)
                continue
            silent = False
            batch, carry = self._gather(unit)
            try:
                patches = self.model.infer(
                    np.stack([u.features for u in batch]), [u.loop_index for u in batch]
                )
            except Exception:  # keep the audio: fall back to idle frames
                log.exception("session %s: model failed on a batch of %d", self.session_id[:8], len(batch))
                patches = [None] * len(batch)
            now = time.monotonic()
            for u, patch in zip(batch, patches):
                u.stamps["model"] = now
                self._to_compositor(u, patch)

    def _gather(self, first: AudioUnit) -> tuple[list[AudioUnit], AudioUnit | None]:
        """Progressive batch: wait for ``min_batch`` speech frames, then take what is
        already queued up to ``batch_size`` (the batch grows when inference is behind).
        Returns the batch and a non-speech unit that ended it, if any."""
        batch = [first]
        while len(batch) < self.options.batch_size and not batch[-1].final:
            if len(batch) < self.options.min_batch:
                nxt = self.unit_queue.get(timeout=0.2)
            else:
                nxt = self.unit_queue.get_nowait()
            if nxt is None or nxt.epoch != first.epoch:
                break
            if not nxt.speech:
                return batch, nxt
            batch.append(nxt)
        return batch, None

    def _to_compositor(self, unit: AudioUnit, patch: Any) -> None:
        self.composite_queue.put((unit, patch), is_stale=lambda: unit.epoch != self.epoch or self._stop.is_set())

    def _composite_loop(self) -> None:
        while not self._stop.is_set():
            item = self.composite_queue.get(timeout=0.1)
            if item is None:
                continue
            unit, patch = item
            if unit.epoch != self.epoch:
                continue
            try:
                # I420 here, off the event loop and the encoder thread
                frame = to_i420(self.avatar.composite(unit.loop_index, patch)) if patch is not None else None
            except Exception:  # never lose the audio for a failed paste-back
                log.exception("session %s: compositing failed", self.session_id[:8])
                frame = None
            if frame is None:
                frame = self.avatar.frame_i420(unit.loop_index)
            unit.stamps["composite"] = time.monotonic()
            media = MediaUnit(
                video=frame,
                video_format="yuv420p",
                audio=np.clip(unit.pcm * 32767.0, -32768, 32767).astype(np.int16),
                loop_index=unit.loop_index % len(self.avatar),
                speech=unit.speech,
                epoch=unit.epoch,
                final=unit.final,
                utterance=unit.utterance,
                text=unit.text,
                t_in=unit.t_in,
                stamps=unit.stamps,
            )
            while not self._stop.is_set() and media.epoch == self.epoch:
                if self.playout.put(media, timeout=0.1):
                    break
