"""Playback events of a session: what the tracks sent, when, and how far it got.

Names and semantics follow LiveKit Agents' avatar protocol (``voice/avatar/``), so a
bridge to a voice agent is a thin adapter:

- ``playback_started {utterance, media_time_ms, wall_time}``: the first 20 ms chunk
  of an utterance (speech or silence) was *sent by the audio track* (not queued).
  ``media_time_ms`` is that chunk's pts on the session clock; ``wall_time`` Unix s.
- ``playback_finished {utterance, playback_position, interrupted}``: its last chunk
  was sent, or it was cut off (interrupt). ``playback_position`` is the seconds of
  that utterance's own audio actually sent (idle slots inserted while a live
  producer was late do not count). An utterance interrupted before its first chunk
  was sent gets only ``playback_finished`` with position 0.
- ``text {utterance, text, media_time_ms}``: a ``/human`` sentence starts playing.
- ``error {msg, seq?}``: something a client sent was refused (e.g. a bad frame).

Utterances are numbered per session from 1: one ``/human`` text, one
``/humanaudio`` file, one WebSocket ``start``..``end``, one microphone talk spurt.

Delivery: :class:`EventBus` fans each event out to subscribers (the ingest
WebSocket, ``GET /events`` Server-Sent Events, a WebRTC data channel labelled
``events``, and ``GET /sse`` in LiveTalking's ``{"status": "start"|"end", "text"}``
shape). Each subscriber has its own bounded queue: a slow consumer loses its
oldest events and is told how many with an ``error`` event; it never slows the
tracks or another subscriber.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from clock import CHUNK_MS, CHUNK_SAMPLES, SAMPLE_RATE

if TYPE_CHECKING:
    from playout import MediaUnit

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 256  # events a subscriber may have pending before its oldest are dropped
FINISHED_KEPT = 64  # finished utterances remembered (for /sse texts and late questions)
SSE_PING_S = 15.0  # SSE keep-alive comment interval (s), below common proxy idle timeouts


class Subscription:
    """One consumer's bounded event queue (drop-oldest when full; the consumer is told).

    Use ``async for event in subscription``; iteration ends when the bus closes.
    """

    def __init__(self, bus: "EventBus", maxsize: int) -> None:
        self._bus = bus
        self._events: deque[dict[str, Any]] = deque()
        self._maxsize = maxsize
        self._dropped = 0
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, event: dict[str, Any]) -> None:
        """Deliver ``event`` to this subscriber only (call on the loop)."""
        if len(self._events) >= self._maxsize:
            self._events.popleft()
            self._dropped += 1
        self._events.append(event)
        self._ready.set()

    def _close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        """The next event, or None once the bus is closed and the queue drained."""
        while True:
            if self._dropped:
                n, self._dropped = self._dropped, 0
                return {"type": "error", "msg": f"{n} events dropped: this subscriber read too slowly"}
            if self._events:
                return self._events.popleft()
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> dict[str, Any]:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        """Unsubscribe."""
        self._bus._subscribers.discard(self)
        self._close()


class EventBus:
    """Per-session fan-out of events to any number of :class:`Subscription` s.

    ``publish`` may be called from any thread; delivery happens on ``loop``.

    Args:
        loop: the event loop subscribers live on (default: the running loop).
        queue_size: events each subscriber may have pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, queue_size: int = SUBSCRIBER_QUEUE) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self._closed = False

    def subscribe(self) -> Subscription:
        """A new subscription (call on the loop). Closed at once if the bus is closed."""
        sub = Subscription(self, self._queue_size)
        if self._closed:
            sub._close()
        else:
            self._subscribers.add(sub)
        return sub

    def publish(self, event: dict[str, Any]) -> None:
        """Deliver ``event`` (a JSON-able dict with a ``type``) to every subscriber."""
        if self._closed:
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._deliver(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: dict[str, Any]) -> None:
        for sub in list(self._subscribers):
            sub.put(event)

    def close(self) -> None:
        """End every subscription (session teardown). Call on the loop."""
        self._closed = True
        for sub in list(self._subscribers):
            sub._close()
        self._subscribers.clear()


@dataclass
class Utterance:
    """Bookkeeping of one utterance. Sample counts are at 16 kHz."""

    id: int
    kind: str  # "text" (/human), "audio" (/humanaudio), "stream" (WebSocket), "mic"
    text: str = ""
    samples: int = 0  # audio pushed so far
    sent: int = 0  # audio of this utterance sent by the audio track
    started: bool = False

    @property
    def position(self) -> float:
        """Seconds of this utterance's audio actually sent."""
        return min(self.sent, self.samples) / SAMPLE_RATE


class PlaybackTracker:
    """Turns the chunks the audio track sends into playback events.

    Utterances are opened by the input routes (any thread); the audio track reports
    every chunk it sends (:meth:`on_chunk`, on the loop); :meth:`interrupt` ends every
    unfinished utterance as interrupted.

    Args:
        publish: where events go (``EventBus.publish``).
    """

    def __init__(self, publish: Callable[[dict[str, Any]], None]) -> None:
        self._publish = publish
        self._lock = threading.Lock()
        self._next_id = 1
        self._open: OrderedDict[int, Utterance] = OrderedDict()
        self._finished: OrderedDict[int, Utterance] = OrderedDict()
        # ms from the last started utterance's first audio entering the session to its
        # first chunk sent (None before any)
        self.last_start_latency_ms: float | None = None

    def open(self, kind: str, text: str = "") -> int:
        """Number a new utterance; returns its id (1, 2, ...)."""
        with self._lock:
            utt = Utterance(self._next_id, kind, text)
            self._next_id += 1
            self._open[utt.id] = utt
            return utt.id

    def add_samples(self, utterance: int, n: int) -> None:
        """Count ``n`` samples (16 kHz) pushed for ``utterance``."""
        with self._lock:
            utt = self._open.get(utterance)
            if utt is not None:
                utt.samples += n

    def is_finished(self, utterance: int) -> bool:
        """True once ``utterance`` finished or was interrupted (or was never opened)."""
        with self._lock:
            return utterance not in self._open

    def get(self, utterance: int) -> Utterance | None:
        with self._lock:
            return self._open.get(utterance) or self._finished.get(utterance)

    @property
    def speaking(self) -> bool:
        """True while an utterance has started playing and has not finished."""
        with self._lock:
            return any(u.started for u in self._open.values())

    def on_chunk(self, unit: "MediaUnit", part: int, audible: bool, chunk: int) -> None:
        """The audio track sent part ``part`` (0 or 1) of ``unit`` as chunk ``chunk``;
        ``audible`` is False when an interrupt silenced it."""
        utt_id = unit.utterance
        if utt_id is None or unit.idle:
            return
        events = []
        with self._lock:
            utt = self._open.get(utt_id)
            if utt is None or not audible:
                return
            media_time_ms = chunk * CHUNK_MS
            if not utt.started:
                utt.started = True
                if unit.t_in:
                    self.last_start_latency_ms = round((time.monotonic() - unit.t_in) * 1000.0, 1)
                events.append({"type": "playback_started", "utterance": utt_id,
                               "media_time_ms": media_time_ms, "wall_time": round(time.time(), 3)})
            if part == 0 and unit.text:
                events.append({"type": "text", "utterance": utt_id, "text": unit.text, "media_time_ms": media_time_ms})
            utt.sent += CHUNK_SAMPLES
            if unit.final and part == len(unit.audio) // CHUNK_SAMPLES - 1:
                events.append(self._finish(utt, interrupted=False))
        for e in events:
            self._publish(e)

    def interrupt(self) -> None:
        """End every unfinished utterance as interrupted (at what was sent so far)."""
        with self._lock:
            events = [self._finish(u, interrupted=True) for u in list(self._open.values())]
        for e in events:
            self._publish(e)

    def _finish(self, utt: Utterance, interrupted: bool) -> dict[str, Any]:
        self._open.pop(utt.id, None)
        self._finished[utt.id] = utt
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        return {"type": "playback_finished", "utterance": utt.id,
                "playback_position": round(utt.position, 3), "interrupted": interrupted}


# -- delivery over HTTP ------------------------------------------------------------------
def setup(app: web.Application, sessions: Callable[[web.Request], Any]) -> None:
    """Add ``GET /events`` (SSE, LiveKit names) and ``GET /sse`` (LiveTalking's shape).

    ``sessions(request)`` returns the request's session (raising the API's 4xx
    error for an unknown one); the session has ``bus`` and ``worker.playback``.
    """

    async def events(request: web.Request) -> web.StreamResponse:
        session = sessions(request)
        return await _stream_sse(request, session, lambda e: e)

    async def sse_livetalking(request: web.Request) -> web.StreamResponse:
        session = sessions(request)
        tracker: PlaybackTracker = session.worker.playback

        def shape(e: dict[str, Any]) -> dict[str, Any] | None:
            status = {"playback_started": "start", "playback_finished": "end"}.get(e["type"])
            if status is None:
                return None
            utt = tracker.get(e["utterance"])
            return {"status": status, "text": utt.text if utt else "", "utterance": e["utterance"]}

        return await _stream_sse(request, session, shape)

    app.router.add_get("/events", events)
    app.router.add_get("/sse", sse_livetalking)


async def _stream_sse(request: web.Request, session: Any, shape: Callable[[dict], dict | None]) -> web.StreamResponse:
    """Stream the session's events as SSE until the client leaves or the session ends."""
    from aiohttp_sse import sse_response

    sub = session.bus.subscribe()

    async def pump(resp) -> None:
        async for event in sub:
            data = shape(event)
            if data is not None:
                await resp.send(json.dumps(data))

    try:
        async with sse_response(request, ping_interval=SSE_PING_S) as resp:
            # Ends when the session's bus closes, or when a ping or send finds the client gone.
            tasks = {asyncio.ensure_future(pump(resp)), asyncio.ensure_future(resp.wait())}
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and isinstance(t.exception(), (ConnectionResetError, TimeoutError)):
                    log.debug("SSE client of session %s left", session.id[:8])
    finally:
        sub.close()
    return resp


def attach_data_channel(channel: Any, bus: EventBus) -> None:
    """Send the session's events as JSON text on a WebRTC data channel (label ``events``)."""
    sub = bus.subscribe()

    async def pump() -> None:
        async for event in sub:
            if channel.readyState != "open":
                if channel.readyState == "closed":
                    break
                continue
            channel.send(json.dumps(event))

    task = asyncio.ensure_future(pump())
    channel.on("close", lambda: (sub.close(), task.cancel()))
