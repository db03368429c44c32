import threading

import numpy as np

from baseasr import AudioInbox, AudioSegment, BaseASR, SpeechQueueFull, StageQueue, chunk_levels_dbfs
from conftest import FakeModel, tone


def run_asr(pcm, model=None, end=True, epoch=0, hangover=3):
    model = model or FakeModel()
    out = StageQueue(1000)
    inbox = AudioInbox(60)
    stop = threading.Event()
    asr = BaseASR(model.features, model.lookbehind_chunks, model.lookahead_chunks, out, inbox,
                  epoch=lambda: epoch, loop_hint=lambda: 100, stop_event=stop, hangover_frames=hangover)
    asr.start()
    inbox.put(AudioSegment(pcm, epoch=epoch, end_of_utterance=end))
    units = []
    while True:
        u = out.get(timeout=2.0)
        assert u is not None, "ASR stalled"
        units.append(u)
        if u.final:
            break
    stop.set()
    asr.join(2)
    return units, model


def test_frames_pair_two_chunks_and_keep_every_sample():
    pcm = tone(1.01)  # 16160 samples: 25 full frames + a partial one
    units, _ = run_asr(pcm)
    assert all(u.pcm.shape == (640,) and u.chunk_speech.shape == (2,) for u in units)
    assert len(units) == 26 + 1  # 26 frames (last zero-padded) + trailing silent final frame
    joined = np.concatenate([u.pcm for u in units])
    np.testing.assert_array_equal(joined[: len(pcm)], pcm)
    assert not joined[len(pcm):].any()
    assert [u.index for u in units] == list(range(len(units)))
    assert [u.loop_index for u in units] == [100 + i for i in range(len(units))]
    assert [u.final for u in units] == [False] * (len(units) - 1) + [True]


def test_speech_tagging_with_hangover_and_no_features_in_silence():
    pcm = np.concatenate([tone(0.4), np.zeros(16000, np.float32)])
    units, model = run_asr(pcm, hangover=3)
    speech = [u.speech for u in units]
    assert all(speech[:10])  # 0.4 s of tone = 10 frames
    assert speech[10:13] == [True, True, True]  # hangover
    assert not any(speech[14:])
    assert all(u.features is None for u in units if not u.speech)
    assert all(u.features is not None for u in units if u.speech)
    # feature windows carry lookbehind + frame + lookahead context
    assert set(model.windows) == {320 + 640 + 320}


def test_stale_epoch_audio_is_dropped():
    out = StageQueue(10)
    inbox = AudioInbox(60)
    stop = threading.Event()
    model = FakeModel()
    asr = BaseASR(model.features, 1, 1, out, inbox, epoch=lambda: 1, loop_hint=lambda: 0, stop_event=stop)
    asr.start()
    inbox.put(AudioSegment(tone(0.2), epoch=0))
    assert out.get(timeout=0.5) is None
    stop.set()
    asr.join(2)


def test_inbox_budget_and_levels():
    inbox = AudioInbox(max_seconds=1.0)
    inbox.put(AudioSegment(tone(0.6), epoch=0))
    try:
        inbox.put(AudioSegment(tone(0.6), epoch=0))
        raise AssertionError("expected SpeechQueueFull")
    except SpeechQueueFull as e:
        assert "speech queue full" in str(e)
    assert inbox.clear() == int(0.6 * 16000)
    levels = chunk_levels_dbfs(np.concatenate([np.zeros(320, np.float32), tone(0.02, level=0.1)]))
    assert levels[0] < -100 and -25 < levels[1] < -18
