import time

import numpy as np

from basereal import BaseReal, SessionOptions
from metrics import Metrics
from conftest import FakeAvatar, FakeModel, tone, wait_for


def make_worker(model, **opts):
    w = BaseReal("s" * 32, model, FakeAvatar(4), SessionOptions(**opts), Metrics().session("s"))
    w.start()
    return w


def drain(worker, slots, start=0):
    """Play `slots` slots as both tracks would (no wall-clock pacing)."""
    return [worker.playout.unit_for_slot(s) for s in range(start, start + slots)]


def test_speech_reaches_playout_with_audio_intact_and_no_model_call_in_silence():
    model = FakeModel()
    w = make_worker(model, batch_size=4, prebuffer=1, playout_capacity=100)
    try:
        pcm = np.concatenate([tone(0.4), np.zeros(8000, np.float32)])
        w.put_audio(pcm)
        assert wait_for(lambda: w.playout.queued >= 20)
        units = drain(w, 30)
        played = [u for u in units if not u.idle]
        audio = np.concatenate([u.audio for u in played]).astype(np.float32) / 32767
        np.testing.assert_allclose(audio[: len(pcm)], pcm, atol=1e-4)
        assert sum(model.batches) == 10 + 3  # 10 speech frames + hangover, none for silence
        assert sum(1 for u in played if u.video[:32].min() > 200) == 13  # rendered (white) frames: Y plane
    finally:
        w.stop()


def test_progressive_batches_grow_when_inference_is_behind():
    model = FakeModel()
    w = make_worker(model, batch_size=8, min_batch=1, playout_capacity=200)
    try:
        # Live-paced input: one frame of audio at a time -> minimum batches.
        pcm = tone(0.4)
        for i in range(0, len(pcm), 640):
            w.put_audio(pcm[i : i + 640], end_of_utterance=False)
            assert wait_for(lambda: sum(model.batches) >= i // 640)
        assert set(model.batches) == {1}
        # Inference falls behind (model blocked) while a burst arrives -> batches grow.
        model._gate.clear()
        n = len(model.batches)
        w.put_audio(tone(2.0))
        assert wait_for(lambda: len(w.unit_queue) >= 8)
        model._gate.set()
        assert wait_for(lambda: sum(model.batches) >= 60)
        assert max(model.batches[n:]) == 8
    finally:
        w.stop()


def test_min_batch_is_waited_for():
    model = FakeModel()
    w = make_worker(model, batch_size=8, min_batch=4, playout_capacity=200)
    try:
        w.put_audio(tone(1.0))
        assert wait_for(lambda: sum(model.batches) >= 25)
        assert all(b >= 4 for b in model.batches[:-1])
    finally:
        w.stop()


def test_interrupt_flushes_every_stage_and_stops_speaking():
    model = FakeModel(delay=0.01)
    w = make_worker(model, batch_size=4, playout_capacity=10)
    try:
        w.put_audio(tone(5.0))
        assert wait_for(lambda: w.playout.queued >= 10)
        assert not w.is_speaking()  # queued, but no track has sent any of it yet
        drain(w, 3)
        assert w.is_speaking()
        w.interrupt()
        units = drain(w, 10, start=3)
        assert all(u.idle for u in units)
        assert wait_for(lambda: not w.is_speaking(), timeout=2.0)
        time.sleep(0.3)  # let any stale work in flight surface (it must not)
        assert all(u.idle for u in drain(w, 10, start=13))
        # the session still speaks after an interrupt
        w.put_audio(tone(0.3))
        assert wait_for(lambda: w.playout.queued >= 5)
        assert not drain(w, 1, start=23)[0].idle
    finally:
        w.stop()


def test_stop_joins_all_threads():
    w = make_worker(FakeModel())
    w.put_audio(tone(1.0))
    w.stop()
    assert not any(t.is_alive() for t in w._threads)
