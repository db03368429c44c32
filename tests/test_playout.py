import threading

import numpy as np

from playout import MediaUnit, PlayoutBuffer
from conftest import FakeAvatar


def unit(i, final=False, epoch=0):
    return MediaUnit(video=np.zeros((2, 2, 3), np.uint8), audio=np.full(640, i, np.int16), loop_index=i, speech=True, epoch=epoch, final=final)


def make(capacity=8, prebuffer=1):
    av = FakeAvatar(3)
    return PlayoutBuffer(av.frame, len(av), capacity=capacity, prebuffer=prebuffer)


def test_idle_when_nothing_queued_loops_the_avatar():
    p = make()
    units = [p.unit_for_slot(s) for s in range(4)]
    assert all(u.idle and not u.audio.any() for u in units)
    assert [u.loop_index for u in units] == [0, 1, 2, 0]


def test_both_tracks_get_the_same_unit_for_a_slot():
    p = make()
    p.put(unit(7))
    first = p.unit_for_slot(0)  # video asks
    assert p.unit_for_slot(0) is first  # audio asks the same slot
    assert not first.idle and first.audio[0] == 7


def test_skipped_slots_still_play_every_unit_in_order():
    p = make()
    for i in range(5):
        p.put(unit(i, final=i == 4))
    # video skips straight to slot 3; slots 0-2 are decided in order on the way
    assert p.unit_for_slot(3).audio[0] == 3
    assert [p.unit_for_slot(s).audio[0] for s in range(3)] == [0, 1, 2]


def test_prebuffer_waits_unless_final_is_queued():
    p = make(prebuffer=3)
    p.put(unit(0))
    p.put(unit(1))
    assert p.unit_for_slot(0).idle  # only 2 of 3 ready
    p.put(unit(2))
    assert not p.unit_for_slot(1).idle
    q = make(prebuffer=3)
    q.put(unit(0, final=True))  # a short utterance starts at once
    assert not q.unit_for_slot(0).idle


def test_underrun_inside_speech_inserts_idle_and_counts():
    p = make()
    p.put(unit(0))
    assert not p.unit_for_slot(0).idle
    assert p.unit_for_slot(1).idle
    assert p.underruns == 1


def test_flush_drops_queue_and_stale_epoch_units():
    p = make()
    for i in range(3):
        p.put(unit(i))
    assert p.flush(epoch=1) == 3
    assert p.unit_for_slot(0).idle
    assert not p.put(unit(9, epoch=0))  # stale epoch refused
    assert p.put(unit(9, epoch=1))


def test_put_blocks_when_full_and_resumes_as_slots_play():
    p = make(capacity=2)
    p.put(unit(0))
    p.put(unit(1))
    done = threading.Event()

    def producer():
        p.put(unit(2))
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.2)  # blocked: buffer full
    p.unit_for_slot(0)
    assert done.wait(2.0)
    t.join()
    assert p.queued == 2
    assert not p.put(unit(3), timeout=0.05)  # full: times out, not queued


def test_underrun_inside_speech_eases_the_face_to_idle_instead_of_snapping():
    from playout import UNDERRUN_FADE_SLOTS

    idle = lambda i: np.zeros((6, 4), np.uint8)  # noqa: E731
    buf = PlayoutBuffer(idle, 1, idle_format="yuv420p", prebuffer=1)
    speech = MediaUnit(video=np.full((6, 4), 200, np.uint8), audio=np.ones(640, np.int16), loop_index=0,
                       video_format="yuv420p")
    buf.put(speech)
    units = [buf.unit_for_slot(s) for s in range(UNDERRUN_FADE_SLOTS + 2)]
    levels = [int(u.video.mean()) for u in units]
    assert levels[0] == 200 and levels[-1] == 0
    assert levels[1:-1] == sorted(levels[1:-1], reverse=True) and 0 < levels[-2] < levels[1] < 200
    assert all(u.idle and not u.audio.any() for u in units[1:])  # silence meanwhile
