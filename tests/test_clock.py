from fractions import Fraction

from clock import (
    AUDIO_CHUNKS_PER_FRAME,
    CHUNK_SAMPLES,
    FRAME_SAMPLES,
    VIDEO_PTS_PER_FRAME,
    SessionClock,
    audio_pts,
    chunk_slot,
    video_pts,
)


class FakeTime:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_constants_pair_two_chunks_per_frame():
    assert CHUNK_SAMPLES == 320 and FRAME_SAMPLES == 640
    assert AUDIO_CHUNKS_PER_FRAME == 2
    assert VIDEO_PTS_PER_FRAME == 3600


def test_pts_of_a_frame_and_its_chunks_are_the_same_instant():
    for slot in (0, 1, 25, 90_000):
        video_time = Fraction(video_pts(slot), 90000)
        for k in range(AUDIO_CHUNKS_PER_FRAME):
            chunk = slot * AUDIO_CHUNKS_PER_FRAME + k
            assert chunk_slot(chunk) == slot
            assert Fraction(audio_pts(chunk), 16000) - video_time == Fraction(k * 20, 1000)


def test_due_times_do_not_drift_over_hours():
    ft = FakeTime()
    clock = SessionClock(ft)
    clock.start()
    one_hour = 25 * 3600
    assert clock.slot_due(one_hour) - clock.t0 == 3600.0
    assert clock.chunk_due(2 * one_hour) == clock.slot_due(one_hour)


def test_current_slot_and_start_once():
    ft = FakeTime(5.0)
    clock = SessionClock(ft)
    assert clock.current_slot() == -1
    clock.start()
    ft.t += 0.039
    assert clock.current_slot() == 0
    ft.t += 0.002
    assert clock.current_slot() == 1
    clock.start()  # second start is a no-op
    assert clock.t0 == 5.0
