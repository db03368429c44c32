"""End to end: live speech streamed over /ws (and the WebRTC microphone) to app.py in a
subprocess, received by a real aiortc client; playback events checked against what
the client actually received.

Times at the client are taken where each RTP packet reaches the receiver, below
aiortc's jitter buffer (``Received.rtp_arrival``). Loose sanity bounds only; the
speed targets live in bench/live.py.
"""

import asyncio
import time

import numpy as np
import pytest

from client import AvatarClient, Received, av_offset, mouth_box
from conftest import SHARED_MEDIA

IDLE_RMS = 1e-4  # received 20 ms blocks below this are idle slots (digital silence through Opus)
NOISE_DBFS = -60.0  # floor added to the clip, so the utterance itself has no digital silence


def clip(seconds: float = 4.0) -> np.ndarray:
    """Real speech at 16 kHz starting and ending on speech, over a -60 dBFS noise floor."""
    from audio import decode_audio

    wav = SHARED_MEDIA / "yongen.wav"
    if wav.exists():
        pcm = decode_audio(wav.read_bytes())
    else:
        from tts import make_tts

        pcm = make_tts("espeak").synthesize("The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.")
    levels = np.sqrt((pcm[: len(pcm) // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1))
    loud = np.flatnonzero(levels > 0.01)
    pcm = pcm[loud[0] * 320 :][: int(seconds * 16000)]
    noise = np.random.default_rng(7).standard_normal(len(pcm)).astype(np.float32) * 10 ** (NOISE_DBFS / 20)
    return (pcm + noise).astype(np.float32)


class Utterance:
    """What the client received of one utterance, from its playback events."""

    def __init__(self, c: AvatarClient, utterance: int) -> None:
        ev = [(t, e) for t, e in c.events if e.get("utterance") == utterance]
        self.kinds = [e["type"] for _, e in ev]
        self.started_at, self.started = next(((t, e) for t, e in ev if e["type"] == "playback_started"), (None, None))
        self.finished = next((e for _, e in ev if e["type"] == "playback_finished"), None)
        rec: Received = c.received
        self.rec = rec
        self.t0 = self.started["media_time_ms"] / 1000 if self.started else None
        self.block_t = np.array(rec.audio_t)
        self.block_rms = np.array([float(np.sqrt(np.mean(a * a))) for a in rec.audio])

    def blocks(self) -> np.ndarray:
        """Indices of received 20 ms blocks from the utterance's start on."""
        return np.flatnonzero(self.block_t >= self.t0 - 1e-6)

    def received_s(self) -> float:
        """Seconds of the utterance's own audio received (idle slots inside it not counted),
        to the 20 ms block."""
        idx = self.blocks()
        live = idx[self.block_rms[idx] > IDLE_RMS]
        return float(len(live)) * 0.02 if len(live) else 0.0

    def where(self, pcm: np.ndarray, clip_t: float, window: float = 0.5) -> float:
        """Media time (s) at which ``pcm[clip_t : clip_t + window]`` was received, minus
        ``clip_t``: the sample-accurate offset of that part of the sent clip (found by
        cross-correlating the received audio, decimated to 16 kHz, with it)."""
        from scipy.signal import correlate, resample_poly

        received = resample_poly(self.rec.audio_signal(), 1, self.rec.audio_rate // 16000)
        a = int(clip_t * 16000)
        ref = pcm[a : a + int(window * 16000)]
        lo = max(0, int((self.t0 + clip_t - 0.1) * 16000))
        seg = received[lo : lo + len(ref) + int(0.8 * 16000)]
        xc = correlate(seg, ref, mode="valid")
        energy = np.sqrt(np.convolve(seg * seg, np.ones(len(ref)), mode="valid")) + 1e-9
        k = int(np.argmax(xc / energy))
        return (lo + k) / 16000 + self.rec.audio_t[0] - clip_t

    def inserted_s(self, pcm: np.ndarray) -> float:
        """Seconds the clip's end was received later (+) or earlier (-) than its start
        predicts: 0 when nothing was lost or doubled, the idle time when the producer
        stalled, minus the audio of dropped messages."""
        start = self.where(pcm, 0.05)
        for back in (0.6, 0.9, 1.2):  # a window with no idle slot inside (they would blur the match)
            clip_t = len(pcm) / 16000 - back
            end = self.where(pcm, clip_t)
            t = end + clip_t
            inside = (self.block_t >= t) & (self.block_t < t + 0.5)
            if not np.any(self.block_rms[inside] <= IDLE_RMS):
                break
        return end - start

    def span_s(self) -> float:
        """From the utterance's first block to the end of its last non-idle block (s)."""
        idx = self.blocks()
        live = idx[self.block_rms[idx] > IDLE_RMS]
        return float(self.block_t[live[-1]] + 0.02 - self.t0)

    def first_audio_arrival(self) -> float:
        return self.rec.rtp_arrival(self.t0)


async def connected(c: AvatarClient) -> None:
    await asyncio.wait_for(c.first_video.wait(), 20)
    await c.open_ws()
    await asyncio.sleep(0.5)


async def settle(c: AvatarClient, n: int = 1, timeout: float = 15) -> None:
    """Wait for ``n`` playback_finished events, then 0.5 s more of media."""
    end = time.monotonic() + timeout
    while len(c.events_of("playback_finished")) < n and time.monotonic() < end:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


def check_utterance(c: AvatarClient, pcm: np.ndarray, utterance: int = 1, lost_s: float = 0.0) -> Utterance:
    u = Utterance(c, utterance)
    assert u.kinds == ["playback_started", "playback_finished"], c.events
    assert not u.finished["interrupted"]
    expected = len(pcm) / 16000 - lost_s
    assert abs(u.finished["playback_position"] - expected) <= 0.02, (u.finished, expected)
    # playback_started is sent when the tracks send the first chunk: it reaches the
    # client close to that chunk's own packet.
    gap = u.started_at - u.first_audio_arrival()
    assert abs(gap) <= 0.08, f"playback_started {gap * 1000:.0f} ms from the utterance's first audio"
    return u


def idle_slots(u: Utterance, pcm: np.ndarray, lost_s: float = 0.0) -> int:
    """Idle slots the playout inserted inside the utterance (the producer was late),
    from where the clip's end was received relative to its start. Asserts that the
    rest is whole slots to the sample: nothing else lost or doubled."""
    inserted = u.inserted_s(pcm) + lost_s
    slots = round(inserted / 0.04)
    assert slots >= 0 and abs(inserted - slots * 0.04) < 0.003, f"{inserted * 1000:.1f} ms inserted: not whole slots"
    return slots


def check_mouth_follows_audio(c: AvatarClient, u: Utterance) -> None:
    rec = c.received
    box = mouth_box(rec.first_frame_bgr)
    before = np.flatnonzero(np.array(rec.video_t) < u.t0)
    lag, r = av_offset(rec, box, t_range=(u.t0, u.t0 + u.span_s()), reference=rec.video[before[-1]])
    assert r > 0.4 and abs(lag) <= 0.04, f"mouth vs audio: lag {lag * 1000:.0f} ms, r={r:.2f}"


@pytest.mark.parametrize(
    "rate, fmt, chunk_ms, framing",
    [(24000, "f32le", 40, "crc32"), (16000, "s16le", 10, "raw"), (16000, "s16le", 500, "raw")],
)
def test_streamed_speech_plays_whole_in_sync_with_events(server, rate, fmt, chunk_ms, framing):
    pcm = clip()

    async def run():
        async with AvatarClient(server.url) as c:
            await connected(c)
            await c.stream_audio(pcm, rate=rate, fmt=fmt, chunk_ms=chunk_ms, framing=framing)
            await settle(c)
            return c

    c = asyncio.run(run())
    assert c.events_of("error") == []
    u = check_utterance(c, pcm)
    # A real-time producer on a jitter buffer of 2 frames: a late message (client or
    # server busy) may cost an idle slot, never audio. bench/live.py counts them.
    assert idle_slots(u, pcm) <= 3
    check_mouth_follows_audio(c, u)


def test_corrupted_crc_and_skipped_seq_each_answer_one_error_and_the_rest_plays(server):
    pcm = clip(3.0)

    def mangle(seq, message):
        if seq == 20:  # corrupt the payload: CRC mismatch
            return message[:30] + bytes([message[30] ^ 0x55]) + message[31:]
        if seq == 40:  # never sent: a gap
            return None
        return message

    async def run():
        async with AvatarClient(server.url) as c:
            await connected(c)
            await c.stream_audio(pcm, rate=24000, fmt="f32le", chunk_ms=40, framing="crc32", mangle=mangle)
            await settle(c)
            return c

    c = asyncio.run(run())
    errors = c.events_of("error")
    assert len(errors) == 2, errors
    assert errors[0]["seq"] == 20 and "CRC" in errors[0]["msg"]
    assert errors[1]["seq"] == 41 and "gap" in errors[1]["msg"]
    u = check_utterance(c, pcm, lost_s=0.08)  # two 40 ms messages
    # each missing message leaves the playout short by its 40 ms: idle slots, no other loss
    assert idle_slots(u, pcm, lost_s=0.08) <= 6


def test_interrupt_mid_stream_silences_fast_and_reports_what_was_received(server):
    pcm = clip(4.0)

    async def run():
        async with AvatarClient(server.url) as c:
            await connected(c)
            await c.stream_audio(pcm[: int(1.6 * 16000)], rate=24000, fmt="f32le", chunk_ms=40, framing="crc32", end=False)
            t_int = time.monotonic()
            await c.ws.send_json({"type": "interrupt"})
            await settle(c)
            await asyncio.sleep(0.5)
            return c, t_int

    c, t_int = asyncio.run(run())
    u = Utterance(c, 1)
    assert u.kinds == ["playback_started", "playback_finished"], c.events
    assert u.finished["interrupted"] is True
    idx = u.blocks()
    arrivals = np.array([c.received.rtp_arrival(t) for t in u.block_t[idx]])
    loud_after = arrivals[(u.block_rms[idx] > IDLE_RMS) & (arrivals > t_int)]
    tail = (loud_after.max() - t_int) if len(loud_after) else 0.0
    assert tail <= 0.2, f"speech still arriving {tail * 1000:.0f} ms after the interrupt"
    received = u.span_s()
    assert 0.5 < received < 1.6
    assert abs(u.finished["playback_position"] - received) <= 0.08, (u.finished, received)


def test_producer_stall_plays_idle_then_resumes_without_burst_or_loss(server):
    pcm = clip(3.0)

    async def run():
        async with AvatarClient(server.url) as c:
            await connected(c)
            await c.stream_audio(pcm, rate=16000, fmt="s16le", chunk_ms=40, stall=(1.2, 0.3))
            await settle(c)
            return c

    c = asyncio.run(run())
    u = check_utterance(c, pcm)
    idx = u.blocks()
    idle = idx[(u.block_rms[idx] <= IDLE_RMS) & (u.block_t[idx] < u.t0 + u.span_s())]
    gap = len(idle) * 0.02
    # The stall shows as one stretch of idle slots about as long as the stall ...
    assert 0.2 <= gap <= 0.5, f"{gap * 1000:.0f} ms idle inside the utterance"
    assert np.all(np.diff(idle) == 1), "idle slots scattered: the stream stuttered"
    # ... by which the rest of the clip is later, to the sample: whole idle slots, nothing lost.
    slots = idle_slots(u, pcm)
    assert 7 <= slots <= 11 and abs(slots * 0.04 - gap) <= 0.06, (slots, gap)
    # ... and afterwards speech goes on in real time: no burst to catch up.
    after = idx[idx > idle[-1]]
    arrivals = np.array([c.received.rtp_arrival(t) for t in u.block_t[after]])
    media = u.block_t[after]
    drift = (arrivals - arrivals[0]) - (media - media[0])
    assert drift.min() > -0.06, f"audio after the stall arrived {-drift.min() * 1000:.0f} ms ahead of real time"


def test_webrtc_microphone_is_mouthed_as_live_speech(server, tmp_path):
    """An aiortc client sends speech as its microphone (sendrecv audio, "mic": "lipsync")."""
    import soundfile as sf
    from aiortc.contrib.media import MediaPlayer

    pcm = clip(3.0)
    wav = tmp_path / "mic.wav"
    sf.write(wav, np.concatenate([np.zeros(8000, np.float32), pcm, np.zeros(16000, np.float32)]), 16000)

    async def run():
        player = MediaPlayer(str(wav))
        c = AvatarClient(server.url)
        c.mic_track = player.audio
        async with c:
            await connected(c)
            await settle(c, timeout=10)
            return c

    c = asyncio.run(run())
    starts = c.events_of("playback_started")
    assert starts, c.events
    u = Utterance(c, starts[0]["utterance"])
    assert u.received_s() > 1.5, u.received_s()
    check_mouth_follows_audio(c, u)


def test_events_reach_sse_livetalking_sse_and_the_data_channel(server):
    """One /human text: the same events on /ws, GET /events (SSE), a data channel
    labelled 'events', and LiveTalking's GET /sse shape; /human answers its utterance."""
    import json

    import aiohttp

    async def read_sse(http, path, sid, out, n):
        async with http.get(f"{server.url}{path}?sessionid={sid}") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data:"):
                    out.append(json.loads(line[5:]))
                    if len(out) >= n:
                        return

    async def run():
        c = AvatarClient(server.url)
        channel = c.pc.createDataChannel("events")
        dc_events = []
        channel.on("message", lambda m: dc_events.append(json.loads(m)))
        async with c:
            await connected(c)
            sse, lt = [], []
            async with aiohttp.ClientSession() as http:
                tasks = [asyncio.ensure_future(read_sse(http, "/events", c.sessionid, sse, 4)),
                         asyncio.ensure_future(read_sse(http, "/sse", c.sessionid, lt, 2))]
                await asyncio.sleep(0.3)
                r = await c.say("Hello there. How are you?")
                await asyncio.wait_for(asyncio.gather(*tasks), 20)
                async with http.get(f"{server.url}/events?sessionid=nope") as bad:
                    unknown = (bad.status, await bad.json())
            await asyncio.sleep(0.3)
            return c, r, sse, lt, dc_events, unknown

    c, r, sse, lt, dc_events, unknown = asyncio.run(run())
    assert r["code"] == 0 and r["utterance"] == 1
    kinds = ["playback_started", "text", "text", "playback_finished"]
    assert [e["type"] for e in sse] == kinds, sse
    assert [e["text"] for e in sse if e["type"] == "text"] == ["Hello there.", "How are you?"]
    assert [e["type"] for _, e in c.events] == kinds
    assert [e["type"] for e in dc_events] == kinds
    assert sse[-1]["playback_position"] > 0.5 and not sse[-1]["interrupted"]
    assert [(e["status"], e["text"]) for e in lt] == [("start", "Hello there. How are you?"), ("end", "Hello there. How are you?")]
    assert unknown[0] == 404 and unknown[1]["code"] == -1
