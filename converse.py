"""A session's conversation: the user's turns in, the LLM's reply out as speech.

:class:`ChatAgent` is one session's side of a chat (``/human`` with ``type: "chat"``,
and the voice turns of the microphone's ``converse`` mode): each user turn starts a
reply from the LLM (``chat.ChatClient``) whose sentences are synthesised and queued
as one utterance *as they arrive*, so the first sentence plays while the LLM is
still writing the rest. The session's playback events drive the history
(``chat.Conversation``): a ``text`` event marks a sentence as started, and
``playback_finished`` records the reply, cut at ``playback_position`` when it was
interrupted. An interrupt (any route, or a barge-in) cancels the LLM stream (the
HTTP request is closed, no more tokens are read) and the synthesis in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from chat import ChatClient, ChatError, Conversation
from clock import SAMPLE_RATE
from ingest import push_live
from tts import TTSError

if TYPE_CHECKING:
    from basereal import BaseReal
    from events import EventBus

log = logging.getLogger(__name__)


class ChatAgent:
    """Replies of the LLM to one session's user turns, spoken sentence by sentence.

    Args:
        worker: the session worker (utterances, audio, interrupts).
        bus: the session's event bus (playback events in, errors out).
        tts: the TTS engine (``tts.TTS``: ``synthesize(sentence) -> float32 16 kHz``).
        client: the server's ``chat.ChatClient``.
        voice: the session's TTS voice (None: the engine's default).
    """

    def __init__(self, worker: "BaseReal", bus: "EventBus", tts: Any, client: ChatClient, voice: str | None = None) -> None:
        self.worker = worker
        self.bus = bus
        self.tts = tts
        self.client = client
        self.voice = voice
        self.conversation = Conversation()
        self._task: asyncio.Task | None = None
        self._utterance: int | None = None
        self._turn = None
        self._timings: list[tuple[float, float]] = []  # (offset s, duration s) per sentence queued
        self._started = 0  # sentences of the current reply whose text event came
        self._sub = bus.subscribe()
        self._listener = asyncio.ensure_future(self._listen())

    @property
    def replying(self) -> bool:
        """True while a reply is being written, synthesised or played."""
        return self._utterance is not None

    def ask(self, text: str) -> int:
        """Start the reply to the user's ``text``; returns its utterance number.

        A reply still in progress is interrupted first (a new user turn supersedes it).
        """
        if self.replying:
            self.worker.interrupt()
        if self._task is not None:
            self._task.cancel()  # its LLM stream closes now, not at its next sentence
        utterance = self.worker.open_utterance("chat", text)
        self._utterance = utterance
        self._turn = None  # set by _reply, after the user's text is recorded
        self._timings, self._started = [], 0
        self._task = asyncio.ensure_future(self._reply(utterance, text))
        return utterance

    async def _reply(self, utterance: int, text: str) -> None:
        prompt = self.conversation.record_user(text)
        turn = self._turn = self.conversation.assistant_turn()
        loop = asyncio.get_running_loop()
        queued = 0  # samples of this utterance queued so far
        try:
            async with self.client.reply(self.conversation.history, prompt) as reply:
                async for sentence in reply:
                    if self.worker.playback.is_finished(utterance):
                        break  # interrupted: the reply's stream closes on leaving the block
                    pcm = await loop.run_in_executor(None, self._synthesize, sentence)
                    if self.worker.playback.is_finished(utterance):
                        break
                    if not len(pcm):
                        continue
                    turn.add(sentence)
                    self._timings.append((queued / SAMPLE_RATE, len(pcm) / SAMPLE_RATE))
                    queued += len(pcm)
                    await push_live(self.worker, pcm, utterance, text=sentence)
        except (ChatError, TTSError) as e:
            log.warning("session %s: %s", self.worker.session_id[:8], e)
            self.bus.publish({"type": "error", "msg": str(e), "utterance": utterance})
        except asyncio.CancelledError:
            pass
        finally:
            if not self.worker.playback.is_finished(utterance):
                self.worker.end_utterance(utterance)

    def _synthesize(self, sentence: str) -> np.ndarray:
        return self.tts.synthesize(sentence, voice=self.voice)

    async def _listen(self) -> None:
        """Follow the current reply's playback events into the history."""
        async for event in self._sub:
            if event.get("utterance") != self._utterance or self._turn is None:
                continue
            kind = event["type"]
            if kind == "text" and self._started < len(self._timings):
                self._turn.sentence_started(self._started, *self._timings[self._started])
                self._started += 1
            elif kind == "playback_finished":
                if event["interrupted"]:
                    self._turn.finish_at(event["playback_position"])
                    if self._task is not None:
                        self._task.cancel()  # closes the LLM stream; drops the synthesis in flight
                else:
                    self._turn.finish()
                self._utterance, self._turn = None, None

    def close(self) -> None:
        """Cancel everything (session teardown)."""
        if self._task is not None:
            self._task.cancel()
        self._listener.cancel()
        self._sub.close()


class VoiceConversation:
    """The microphone of a ``"mic": "converse"`` session as the user's side of a
    voice conversation.

    The peer's audio track (aiortc: 48 kHz s16) is resampled to 16 kHz and fed to a
    ``vad.TurnDetector`` on the event loop (~0.1 ms per 32 ms frame). Its events:

    - ``speech_start``: the user started talking. If the avatar is speaking or a
      reply is on its way and barge-in is on, the session is interrupted at once
      (the avatar is silent from the next 20 ms chunk; the LLM stream is closed).
      The detector's ``vad.EchoGuard`` holds what the avatar *sent* (fed by the audio
      track), so the avatar's own voice coming back through the user's speakers
      does not count as the user (the page's echo cancellation removes most of it).
    - ``turn_end``: the turn's audio is transcribed (``stt``), published as a
      ``{"type": "transcript", "text", "utterance"}`` event, and sent to chat; the
      reply plays as utterance ``utterance``.

    Args:
        worker, bus: the session's worker and event bus.
        agent: the session's :class:`ChatAgent`.
        stt: a speech-to-text backend (``stt.STT``: ``await transcribe(pcm16k)``).
        track: the peer's audio track.
        barge_in: interrupt the avatar when the user starts talking.
    """

    def __init__(self, worker: "BaseReal", bus: "EventBus", agent: ChatAgent, stt: Any, track: Any,
                 barge_in: bool = True) -> None:
        from vad import EchoGuard, TurnDetector

        self.worker = worker
        self.bus = bus
        self.agent = agent
        self.stt = stt
        self.track = track
        self.barge_in = barge_in
        self.echo = EchoGuard()
        self.detector = TurnDetector(echo=self.echo)
        self._resampler = None
        self._rate = 0
        self._tasks: set[asyncio.Task] = set()

    def on_sent(self, pcm16: np.ndarray) -> None:
        """The audio track sent this 16 kHz int16 chunk (the echo reference)."""
        self.echo.push_reference(pcm16.astype(np.float32) / np.float32(32768.0))

    async def run(self) -> None:
        """Consume the track until it ends."""
        from aiortc.mediastreams import MediaStreamError

        from audio import StreamResampler
        from ingest import frame_to_mono

        try:
            while True:
                frame = await self.track.recv()
                if frame.sample_rate != self._rate:
                    self._rate, self._resampler = frame.sample_rate, StreamResampler(frame.sample_rate)
                for event in self.detector.feed(self._resampler.process(frame_to_mono(frame))):
                    self._on_event(event)
        except MediaStreamError:
            pass
        finally:
            for task in self._tasks:
                task.cancel()

    def _on_event(self, event: Any) -> None:
        if event.kind == "speech_start":
            if self.barge_in and (self.worker.is_speaking() or self.agent.replying):
                log.info("session %s: barge-in", self.worker.session_id[:8])
                self.worker.interrupt()
        elif event.kind == "turn_end" and event.audio is not None:
            task = asyncio.ensure_future(self._answer(event.audio))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, pcm: np.ndarray) -> None:
        from stt import STTError

        try:
            text = (await self.stt.transcribe(pcm)).strip()
        except STTError as e:
            self.bus.publish({"type": "error", "msg": f"speech-to-text failed: {e}"})
            return
        if not text:
            return
        utterance = self.agent.ask(text)
        self.bus.publish({"type": "transcript", "text": text, "utterance": utterance})
