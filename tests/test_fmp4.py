"""GET /stream/<sessionid>.mp4 end to end: app.py in a subprocess (with --api_key), a
real aiortc peer, and PyAV decoding the live fragmented MP4 while the session speaks.

Loose sanity bounds only; the speed targets (first bytes, first decodable frame <=
400 ms, first speech next to WebRTC's) live in bench/fmp4.py.
"""

import asyncio
import io

import aiohttp
import numpy as np
import pytest

from bench.fmp4 import SPEECH_RMS, block_rms, read_stream, received_from_mp4
from client import AvatarClient, ServerProcess, av_offset, mouth_box
from conftest import shared_media

KEY = "fmp4-test-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("fmp4"), "--api_key", KEY, "--max_session", "2",
                        "--stream_max_readers", "2")
    yield srv
    srv.stop()


def speech_wav(seconds: float = 3.0) -> bytes:
    """The first ``seconds`` s of ../shared/media/yongen.wav from its first loud chunk, as WAV bytes."""
    import soundfile as sf

    from audio import decode_audio

    pcm = decode_audio(shared_media("yongen.wav").read_bytes())
    levels = np.sqrt((pcm[: len(pcm) // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1))
    pcm = pcm[int(np.flatnonzero(levels > 0.01)[0]) * 320 :][: int(seconds * 16000)]
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def stream_url(srv, c: AvatarClient) -> str:
    return f"{srv.url}/stream/{c.sessionid}.mp4"


def test_stream_plays_in_sync_while_speaking(keyed):
    """A reader that opens the stream before the session speaks gets 25 fps video with
    continuous audio, the mouth moving with the sound (A/V offset within 40 ms), and
    its first bytes soon after the request."""
    wav = speech_wav(3.0)

    async def run():
        async with AvatarClient(keyed.url, api_key=KEY) as c, aiohttp.ClientSession() as http:
            await asyncio.wait_for(c.first_video.wait(), 20)
            auth = {"Authorization": f"Bearer {c.token}"}
            reader = asyncio.ensure_future(read_stream(http, stream_url(keyed, c), auth, seconds=5.5))
            await asyncio.sleep(1.0)  # idle media first: the mouth's reference
            answer = await c.push_audio(wav)
            assert answer["code"] == 0, answer
            return await reader

    r = asyncio.run(run())
    assert r.status == 200, r.body
    assert r.t_first_byte is not None and r.t_first_byte - r.t_request < 1.5, "no prompt first bytes"
    rec, _ = received_from_mp4(bytes(r.data))
    vt = np.array(rec.video_t)
    assert len(vt) >= 4.5 * 25, f"{len(vt)} frames in ~5.5 s"
    steps = np.diff(vt[1:])  # frame 0 lasts one AAC priming frame longer (the muxer's shift)
    assert np.allclose(steps, 0.04, atol=1e-3), f"frame steps not 40 ms: {sorted(set(np.round(steps, 4)))}"
    at = np.array(rec.audio_t)
    block = 1024 / rec.audio_rate
    assert rec.audio_rate == 48000 and np.allclose(np.diff(at), block, atol=1e-4), "audio has gaps"
    assert abs(at[-1] + block - vt[-1]) < 0.3, "audio and video cover different spans"
    rms = block_rms(rec)
    loud = np.flatnonzero(rms > SPEECH_RMS)
    assert len(loud) * block > 2.0, f"only {len(loud) * block:.1f} s of speech in the stream"
    t0, t1 = at[loud[0]], at[loud[-1]] + block
    before = np.flatnonzero(vt < t0 - 0.1)
    box = mouth_box(rec.first_frame_bgr)
    lag, corr = av_offset(rec, box, t_range=(t0, t1), reference=rec.video[before[-1]])
    assert corr > 0.4 and abs(lag) <= 0.04, f"mouth vs audio in the fMP4: lag {lag * 1000:.0f} ms, r={corr:.2f}"


def test_stream_refusals(keyed):
    """Unknown session 404, wrong or missing token 401, readers beyond
    --stream_max_readers 429, each with a message; a reader that leaves frees its place."""

    async def run():
        async with AvatarClient(keyed.url, api_key=KEY) as c, aiohttp.ClientSession() as http:
            await asyncio.wait_for(c.first_video.wait(), 20)
            good = {"Authorization": f"Bearer {c.token}"}
            unknown = await read_stream(http, f"{keyed.url}/stream/{'0' * 32}.mp4", {"Authorization": f"Bearer {KEY}"})
            bad = await read_stream(http, stream_url(keyed, c), {"Authorization": "Bearer wrong"})
            none = await read_stream(http, stream_url(keyed, c))
            readers = [asyncio.ensure_future(read_stream(http, stream_url(keyed, c), good, seconds=2.0)) for _ in range(2)]
            await asyncio.sleep(1.0)
            third = await read_stream(http, stream_url(keyed, c), good, seconds=0.5)
            first_two = await asyncio.gather(*readers)
            await asyncio.sleep(0.3)
            again = await read_stream(http, stream_url(keyed, c) + f"?token={c.token}", seconds=0.8)
            return unknown, bad, none, third, first_two, again

    unknown, bad, none, third, first_two, again = asyncio.run(run())
    assert unknown.status == 404 and "unknown session" in unknown.body
    assert bad.status == 401 and "token" in bad.body
    assert none.status == 401
    assert [r.status for r in first_two] == [200, 200] and all(len(r.data) > 10_000 for r in first_two)
    assert third.status == 429 and "stream_max_readers" in third.body
    assert again.status == 200 and again.data[4:8] == b"ftyp", "a freed place is usable (?token= works too)"


def test_stream_ends_when_the_session_closes(keyed):
    """The response ends (cleanly, decodable) once the session is gone."""

    async def run():
        c = AvatarClient(keyed.url, api_key=KEY)
        await c.connect()
        async with aiohttp.ClientSession() as http:
            await asyncio.wait_for(c.first_video.wait(), 20)
            reader = asyncio.ensure_future(read_stream(http, stream_url(keyed, c), {"Authorization": f"Bearer {c.token}"},
                                                       seconds=15.0))
            await asyncio.sleep(1.0)
            await c.close()  # the peer leaves: the server closes the session
            return await reader

    r = asyncio.run(run())
    assert r.status == 200
    assert r.chunks[-1][0] - r.t_request < 10.0, "the stream outlived its session"
    rec, _ = received_from_mp4(bytes(r.data))
    assert len(rec.video_t) >= 20


# -- the parts, without a server ---------------------------------------------------------
def _playout(units: int, history: int = 25):
    from playout import MediaUnit, PlayoutBuffer

    def idle(i):
        return np.full((48, 32), 16, np.uint8)

    pb = PlayoutBuffer(idle, 4, idle_format="yuv420p", capacity=units, prebuffer=1, history=history)
    for k in range(units):
        pb.put(MediaUnit(video=np.full((48, 32), k, np.uint8), audio=np.full(640, k, np.int16), loop_index=0,
                         video_format="yuv420p"))
    return pb


def test_follower_gets_the_units_the_tracks_got():
    """A follower in another thread yields, slot by slot, the very unit the tracks got
    for that slot (same object: same pts, same A/V pairing), takes nothing from the
    tracks, and skips (counting) what fell out of the history while it lagged."""
    import threading

    from muxer import SlotFollower

    pb = _playout(40, history=40)  # room for a follower that lags the whole run
    stop = threading.Event()
    follower = SlotFollower(pb, stop, end_slot=lambda: 40)
    got = []
    thread = threading.Thread(target=lambda: got.extend(follower))
    thread.start()
    sent = [pb.unit_for_slot(s) for s in range(40)]  # the tracks, as fast as they like
    thread.join(5)
    assert [s for s, _, _ in got] == list(range(40)) and follower.skipped == 0
    assert all(u is sent[s] for s, u, _ in got)
    assert all(u.audio[0] == s and audible for s, u, audible in got), "the tracks' own queue order"

    pb = _playout(40, history=25)
    for s in range(40):
        pb.unit_for_slot(s)
    late = SlotFollower(pb, stop, start=0, end_slot=lambda: 40)  # 40 slots behind a 25-slot history
    slots = [s for s, _, _ in late]
    assert slots == list(range(15, 40)) and late.skipped == 15


def test_slow_reader_is_dropped_and_never_waited_for():
    """The mux thread's writes never wait for the HTTP side: a reader more than
    max_bytes behind is dropped (later writes fail at once), and its read ends."""
    import threading
    import time

    from muxer import ByteChannel, ChannelClosed

    async def run():
        channel = ByteChannel(asyncio.get_running_loop(), max_bytes=10_000)
        outcome = {}

        def writer():
            t0 = time.monotonic()
            try:
                for _ in range(100):
                    channel.write(b"x" * 1000)
            except ChannelClosed as e:
                outcome["error"] = str(e)
            outcome["took"] = time.monotonic() - t0

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join(5)
        return outcome, channel.overflowed, await channel.read()

    outcome, overflowed, data = asyncio.run(run())
    assert overflowed and "dropped" in outcome["error"] and outcome["took"] < 1.0
    assert data == b"", "a dropped reader gets the end of its stream"


PLAY_JS = """async ({src, ms}) => {
  const v = document.createElement('video');
  v.muted = true; v.autoplay = true; v.src = src;
  document.body.appendChild(v);
  const end = performance.now() + ms;
  while (performance.now() < end && v.currentTime < 2.0 && !v.error) await new Promise(r => setTimeout(r, 100));
  return {time: v.currentTime, width: v.videoWidth, ready: v.readyState, error: v.error && v.error.message,
          audio: v.webkitAudioDecodedByteCount || 0, frames: v.getVideoPlaybackQuality().totalVideoFrames};
}"""


@pytest.mark.browser
def test_video_element_plays_the_stream(keyed):
    """Chromium's <video> plays GET /stream/<id>.mp4 as it comes: video advances past
    2 s of media at the avatar's size, and it decodes the AAC audio."""
    from test_browser import CHROMIUM, CHROMIUM_FLAGS, _require_browser

    _require_browser()
    from playwright.async_api import async_playwright

    async def run():
        async with AvatarClient(keyed.url, api_key=KEY) as c, async_playwright() as p:
            await asyncio.wait_for(c.first_video.wait(), 20)
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            try:
                page = await browser.new_page()
                await page.goto(keyed.url + "/")
                got = await page.evaluate(PLAY_JS, {"src": f"/stream/{c.sessionid}.mp4?token={c.token}", "ms": 10000})
            finally:
                await browser.close()
            return got, c.received.first_frame_bgr.shape[1]

    got, width = asyncio.run(run())
    assert got["error"] is None and got["time"] >= 2.0, got
    assert got["width"] == width and got["audio"] > 0 and got["frames"] >= 40, got
