"""Track pacing on the session clock: video waits when early, skips stale frames
when late (counted), audio is never skipped; pts follow slot and chunk counts."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np

from clock import SessionClock
from events import PlaybackTracker
from metrics import Metrics
from playout import MediaUnit, PlayoutBuffer
from webrtc import AvatarAudioTrack, AvatarVideoTrack
from conftest import FakeAvatar


class ShiftedTime:
    """Real monotonic time plus an offset we can bump to simulate a stall."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def make_worker(drop_ms=40):
    av = FakeAvatar(4)
    clock_time = ShiftedTime()
    worker = SimpleNamespace(
        clock=SessionClock(clock_time),
        playout=PlayoutBuffer(av.frame, len(av), capacity=100),
        metrics=Metrics().session("t"),
        options=SimpleNamespace(drop_threshold_ms=drop_ms),
        stopped=False,
        playback=PlaybackTracker(lambda event: None),
    )
    return worker, clock_time


def test_video_waits_for_due_time_and_pts_count_frames():
    worker, _ = make_worker()
    track = AvatarVideoTrack(worker)

    async def run():
        frames, times = [], []
        for _ in range(5):
            frames.append(await track.recv())
            times.append(time.monotonic())
        return frames, times

    frames, times = asyncio.run(run())
    assert [f.pts for f in frames] == [0, 3600, 7200, 10800, 14400]
    assert 0.14 <= times[-1] - times[0] <= 0.3  # 4 frame intervals of 40 ms, not a burst
    assert worker.metrics.frames_dropped == 0


def test_late_video_skips_stale_frames_instead_of_bursting():
    worker, shift = make_worker(drop_ms=40)
    video, audio = AvatarVideoTrack(worker), AvatarAudioTrack(worker)
    for i in range(20):
        worker.playout.put(MediaUnit(np.zeros((4, 4, 3), np.uint8), np.full(640, i, np.int16), i, speech=True))

    async def run():
        await video.recv()  # slot 0
        await audio.recv()  # chunk 0
        shift.offset += 0.49  # the sender stalled for about half a second
        late_frame = await video.recv()
        chunks = [await audio.recv() for _ in range(5)]
        return late_frame, chunks

    late_frame, chunks = asyncio.run(run())
    assert late_frame.pts == 12 * 3600  # jumped to the nearest slot (12.25 -> 12)
    assert worker.metrics.frames_dropped == 11
    assert worker.metrics.frames_late == 0  # the frame it did send was on time
    # audio is never skipped: every chunk, in order, with its unit's samples
    assert [c.pts for c in chunks] == [960 * k for k in range(1, 6)]  # 48 kHz
    assert [c.sample_rate for c in chunks] == [48000] * 5
    assert [int(c.to_ndarray()[0, 480]) for c in chunks] == [0, 1, 1, 2, 2]  # mid-chunk, past the filter


def test_lateness_under_the_threshold_is_sent_and_counted_late():
    worker, shift = make_worker(drop_ms=80)
    video = AvatarVideoTrack(worker)

    async def run():
        await video.recv()
        shift.offset += 0.04 + 0.06  # slot 1 is now 60 ms late: under 80 ms
        return await video.recv()

    frame = asyncio.run(run())
    assert frame.pts == 3600
    assert worker.metrics.frames_dropped == 0 and worker.metrics.frames_late == 1
