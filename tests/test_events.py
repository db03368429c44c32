"""Playback events: the bus (bounded per subscriber, thread-safe publish) and the
tracker driven by a real session worker whose slots are sent as the audio track does."""

import asyncio
import threading

import numpy as np
import pytest

from basereal import BaseReal, SessionOptions
from events import EventBus, PlaybackTracker
from metrics import Metrics
from conftest import FakeAvatar, FakeModel, tone, wait_for


# -- the bus -----------------------------------------------------------------------------------
def test_bus_fans_out_in_order_and_publish_works_from_other_threads():
    async def go():
        bus = EventBus()
        a, b = bus.subscribe(), bus.subscribe()
        bus.publish({"type": "x", "n": 1})
        t = threading.Thread(target=lambda: bus.publish({"type": "x", "n": 2}))
        t.start()
        t.join()
        got_a = [await asyncio.wait_for(a.get(), 1) for _ in range(2)]
        got_b = [await asyncio.wait_for(b.get(), 1) for _ in range(2)]
        bus.close()
        return got_a, got_b, await a.get()

    got_a, got_b, after_close = asyncio.run(go())
    assert [e["n"] for e in got_a] == [1, 2] == [e["n"] for e in got_b]
    assert after_close is None


def test_slow_subscriber_loses_its_oldest_events_and_is_told():
    async def go():
        bus = EventBus(queue_size=4)
        slow, other = bus.subscribe(), bus.subscribe()
        for n in range(10):
            bus.publish({"type": "x", "n": n})
        first = await slow.get()
        rest = [await slow.get() for _ in range(4)]
        return first, rest, [await other.get() for _ in range(5)][1:]

    first, rest, other = asyncio.run(go())
    assert first["type"] == "error" and "6 events dropped" in first["msg"]
    assert [e["n"] for e in rest] == [6, 7, 8, 9]
    assert [e["n"] for e in other] == [6, 7, 8, 9]  # its own queue: same bound, same policy


# -- the tracker -------------------------------------------------------------------------------
def make_worker(events, **opts):
    opts = {"batch_size": 4, "prebuffer": 1, "playout_capacity": 400, **opts}
    w = BaseReal("e" * 32, FakeModel(), FakeAvatar(4), SessionOptions(**opts), Metrics().session("e"),
                 publish=events.append)
    w.start()
    return w


def send_slots(worker, first_chunk, n_chunks):
    """Send ``n_chunks`` audio chunks as the audio track does (no wall-clock pacing);
    returns the int16 audio sent."""
    out = []
    for chunk in range(first_chunk, first_chunk + n_chunks):
        unit = worker.playout.unit_for_slot(chunk // 2)
        part = chunk % 2
        audible = unit.epoch == worker.playout.epoch
        out.append(unit.audio[part * 320 : (part + 1) * 320] if audible else np.zeros(320, np.int16))
        worker.playback.on_chunk(unit, part, audible, chunk)
    return np.concatenate(out)


def test_streamed_utterance_events_in_order_with_full_position():
    events = []
    w = make_worker(events)
    try:
        utt = w.open_utterance("stream")
        pcm = tone(1.0)
        for i in range(0, len(pcm), 160):  # 10 ms pieces, as a live producer sends them
            w.put_audio(pcm[i : i + 160], end_of_utterance=False, utterance=utt)
        w.end_utterance(utt)
        assert wait_for(lambda: w.playout.queued >= 26)
        assert not events  # queued is not playing: nothing said yet
        audio = send_slots(w, 0, 60)
    finally:
        w.stop()
    kinds = [e["type"] for e in events]
    assert kinds == ["playback_started", "playback_finished"], events
    started, finished = events
    assert started["utterance"] == finished["utterance"] == utt
    assert started["media_time_ms"] == 0 and started["wall_time"] > 1.7e9
    assert finished == {"type": "playback_finished", "utterance": utt, "playback_position": 1.0, "interrupted": False}
    # Every sample pushed was sent once, in order.
    np.testing.assert_allclose(audio[:16000] / 32767.0, pcm, atol=1e-4)


def test_text_events_mark_where_each_sentence_starts():
    events = []
    w = make_worker(events)
    try:
        utt = w.open_utterance("text", "One. Two.")
        w.put_audio(tone(0.3), end_of_utterance=False, utterance=utt, text="One.")
        w.put_audio(tone(0.5), end_of_utterance=False, utterance=utt, text="Two.")
        w.end_utterance(utt)
        assert wait_for(lambda: w.playout.queued >= 21)
        send_slots(w, 0, 50)
    finally:
        w.stop()
    assert [e["type"] for e in events] == ["playback_started", "text", "text", "playback_finished"]
    assert [(e["text"], e["media_time_ms"]) for e in events if e["type"] == "text"] == [("One.", 0), ("Two.", 280)]
    # "Two." starts at 0.3 s, inside the frame that starts at 0.28 s
    assert events[-1]["playback_position"] == 0.8


def test_interrupt_finishes_playing_and_queued_utterances_with_what_was_sent():
    events = []
    w = make_worker(events)
    try:
        first = w.open_utterance("audio")
        w.put_audio(tone(2.0), utterance=first)
        second = w.open_utterance("audio")
        w.put_audio(tone(1.0), utterance=second)
        assert wait_for(lambda: w.playout.queued >= 40)
        send_slots(w, 0, 25)  # 0.5 s of the first
        w.interrupt()
        after = send_slots(w, 25, 20)
    finally:
        w.stop()
    assert [e["type"] for e in events] == ["playback_started", "playback_finished", "playback_finished"]
    assert events[1] == {"type": "playback_finished", "utterance": first, "playback_position": 0.5, "interrupted": True}
    # the queued one never started: it only finishes, at position 0
    assert events[2] == {"type": "playback_finished", "utterance": second, "playback_position": 0.0, "interrupted": True}
    assert not np.any(after[320:])  # the rest of the slot in flight is silenced, then idle


def test_late_producer_gets_idle_slots_and_its_utterance_stays_open():
    events = []
    w = make_worker(events)
    try:
        utt = w.open_utterance("stream")
        w.put_audio(tone(0.4), end_of_utterance=False, utterance=utt)
        assert wait_for(lambda: w.playout.queued >= 9)
        first = send_slots(w, 0, 40)  # 0.8 s: the producer is late for the second half
        assert w.is_speaking()  # still inside the utterance
        w.put_audio(tone(0.4), end_of_utterance=False, utterance=utt)
        w.end_utterance(utt)
        assert wait_for(lambda: w.playout.queued >= 10)
        second = send_slots(w, 40, 60)
    finally:
        w.stop()
    assert [e["type"] for e in events] == ["playback_started", "playback_finished"]
    assert events[1]["playback_position"] == pytest.approx(0.8) and not events[1]["interrupted"]
    # all 0.8 s of speech was sent, with silence where the producer was late
    loud = lambda a: int((np.abs(a.reshape(-1, 320)).max(axis=1) > 1000).sum())  # noqa: E731
    assert loud(first) + loud(second) == 40


def test_tracker_counts_only_what_was_sent_and_ignores_idle_units():
    events = []
    t = PlaybackTracker(events.append)
    u = t.open("stream")
    t.add_samples(u, 1000)
    assert not t.speaking and not t.is_finished(u)
    t.interrupt()
    assert t.is_finished(u) and events[-1]["playback_position"] == 0.0
