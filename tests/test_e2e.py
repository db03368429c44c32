"""End to end: app.py in a subprocess, a real aiortc client, real speech.

Loose sanity bounds only; the speed targets live in bench/.
"""

import asyncio
import time

import numpy as np
import pytest

from client import AvatarClient, av_offset, mouth_box, mouth_motion
from conftest import SPEECH_RMS, frame_rms, loud_since, not_, speech_input, wait_until


def test_speech_streams_with_moving_mouth_in_sync(server):
    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            await asyncio.sleep(1.5)  # idle: mouth must stay still
            kind, payload = speech_input()
            t_push = time.monotonic()
            r = await (c.push_audio_file(payload) if kind == "file" else c.say(payload))
            assert r["code"] == 0, r
            assert await wait_until(c.is_speaking, 5)
            assert await wait_until(lambda: not_(c.is_speaking), 40)
            await asyncio.sleep(1.0)
            return c.received, t_push

    rec, t_push = asyncio.run(run())
    vt, at = np.array(rec.video_t), np.array(rec.audio_t)
    # Video at >= 24 fps on the media clock and on arrival; audio continuous.
    duration = rec.video_arrival[-1] - rec.video_arrival[0]
    assert len(rec.video) / duration >= 24.0, f"{len(rec.video)} frames in {duration:.2f} s"
    assert np.all(np.diff(vt) > 0) and np.median(np.diff(vt)) == pytest.approx(0.04, abs=1e-6)
    assert np.allclose(np.diff(at), 0.02, atol=1e-6), "audio timeline has gaps"
    assert at[-1] == pytest.approx(vt[-1], abs=0.5)
    # Speech arrived.
    rms = frame_rms(rec)
    speech_s = float((rms > SPEECH_RMS).sum()) * 0.02
    assert speech_s > 2.0, f"only {speech_s:.2f} s of speech received"
    # Mouth still in silence, moving during speech.
    # (the encoder's quality settles during the first second: compare with the
    # last idle frame before the push, not the first frame)
    box = mouth_box(rec.first_frame_bgr)
    before = np.flatnonzero(np.array(rec.video_arrival) < t_push)
    motion = mouth_motion(rec, box, reference=rec.video[before[-1]])
    env_v = np.interp(vt, at, np.convolve(rms, np.ones(2) / 2, "same"))
    idle = motion[before[-10:]]
    talking = motion[env_v > 3 * SPEECH_RMS]
    assert idle.max() < 1.5, f"mouth moves in silence: {idle.max():.2f}"
    assert talking.mean() > 4 * max(idle.mean(), 0.5), (talking.mean(), idle.mean())
    # Mouth motion follows the audio envelope, peak within +-40 ms.
    lag, r = av_offset(rec, box, reference=rec.video[before[-1]])
    print(f"A/V offset {lag * 1000:.0f} ms, r={r:.2f}, idle max {idle.max():.2f}, talking mean {talking.mean():.2f}, speech {speech_s:.1f} s")
    assert r > 0.4, f"mouth motion barely correlates with audio (r={r:.2f})"
    assert abs(lag) <= 0.040, f"A/V offset {lag * 1000:.0f} ms"


def test_interrupt_silences_within_200ms(server):
    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            kind, payload = speech_input()
            if kind == "file":
                await c.push_audio_file(payload)
            else:
                await c.say(payload)
            rec = c.received
            n0 = len(rec.audio)
            assert await wait_until(lambda: loud_since(rec, n0), 10), "no speech arrived"
            await asyncio.sleep(0.5)
            t_int = time.monotonic()
            assert (await c.interrupt())["code"] == 0
            await asyncio.sleep(1.5)
            speaking = await c.is_speaking()
            return rec, t_int, speaking

    rec, t_int, speaking = asyncio.run(run())
    rms = frame_rms(rec)
    arrival = np.array(rec.audio_arrival)
    loud_after = arrival[(rms > SPEECH_RMS) & (arrival > t_int)]
    tail = (loud_after.max() - t_int) if len(loud_after) else 0.0
    assert tail <= 0.2, f"speech still arriving {tail * 1000:.0f} ms after interrupt"
    assert not speaking




def test_human_echo_speaks_text_and_interrupt_flag_replaces_speech(server):
    long_text = "This is a long sentence that keeps the avatar talking for quite a while. " * 6

    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            rec = c.received
            assert (await c.say(long_text))["code"] == 0
            n0 = len(rec.audio)
            assert await wait_until(lambda: loud_since(rec, n0), 10), "TTS speech never arrived"
            await asyncio.sleep(0.5)
            t_replace = time.monotonic()
            assert (await c.say("Stop.", interrupt=True))["code"] == 0
            assert await wait_until(lambda: not_(c.is_speaking), 10), "still speaking the long text"
            return time.monotonic() - t_replace

    took = asyncio.run(run())
    assert took < 5.0, f"replacing speech took {took:.1f} s: the long text was not interrupted"
