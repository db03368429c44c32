"""End to end: a voice conversation ("mic": "converse") with app.py in a subprocess,
a fake OpenAI-compatible LLM and speech-to-text, and an aiortc client whose
microphone sends speech and an echo of the avatar's own voice."""

import asyncio
import time

import numpy as np
import pytest

from client import AvatarClient, MicrophoneTrack, ServerProcess
from conftest import SHARED_MEDIA
from fake_openai import FakeOpenAI

STORY = " ".join(f"This is sentence number {n} of a long story that the avatar tells." for n in range(1, 25))
SPEECH_RMS = 0.01
ECHO_GAIN = 0.18  # -15 dB: a laptop speaker heard by its own microphone, after the browser's echo canceller


def user_speech() -> np.ndarray:
    """About 2 s of real speech at 16 kHz, starting on speech."""
    from audio import decode_audio

    wav = SHARED_MEDIA / "sun.wav"
    if wav.exists():
        pcm = decode_audio(wav.read_bytes())
    else:
        from tts import make_tts

        pcm = make_tts("espeak").synthesize("Wait, please stop. I have a question about the weather tomorrow.")
    levels = np.sqrt((pcm[: len(pcm) // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1))
    return pcm[np.flatnonzero(levels > 0.02)[0] * 320 :][: 2 * 16000]


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(reply=STORY, token_delay=0.01, transcript="What will the weather be tomorrow?") as f:
        yield f


@pytest.fixture(scope="module")
def converse_server(tmp_path_factory, fake):
    srv = ServerProcess(tmp_path_factory.mktemp("converse"), "--llm_url", fake.url, "--llm_model", "fake",
                        "--stt", "openai", "--stt_url", fake.url)
    yield srv
    srv.stop()


def loud_arrivals(c: AvatarClient, since: float) -> np.ndarray:
    """RTP arrival times (below the jitter buffer) of received speech blocks after ``since``."""
    rec = c.received
    out = [rec.rtp_arrival(t) for t, a in zip(rec.audio_t, rec.audio) if np.sqrt(np.mean(a * a)) > SPEECH_RMS]
    out = np.array([t for t in out if t is not None])
    return out[out > since]


def test_barge_in_silences_the_avatar_its_echo_does_not_and_the_question_is_answered(converse_server, fake):
    async def run():
        c = AvatarClient(converse_server.url)
        mic = MicrophoneTrack(c.received, echo_gain=ECHO_GAIN, echo_delay=0.08)
        c.mic_track, c.mic_mode = mic.track, "converse"
        async with c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            await c.open_ws()
            r = await c.post("/human", {"sessionid": c.sessionid, "text": "Tell me a story.", "type": "chat"})
            assert r["code"] == 0, r
            # 4 s of the avatar talking, its echo going back into the microphone
            t_talk = time.monotonic()
            while time.monotonic() - t_talk < 6 and not len(loud_arrivals(c, 0)):
                await asyncio.sleep(0.05)
            await asyncio.sleep(4.0)
            echo_interrupts = [e for e in c.events_of("playback_finished") if e["interrupted"]]
            # the user talks over the avatar
            mic.say(user_speech())
            await asyncio.sleep(0.1)
            while mic.speech_started_at is None:
                await asyncio.sleep(0.01)
            t_user = mic.speech_started_at
            end = time.monotonic() + 15
            while time.monotonic() < end and not c.events_of("transcript"):
                await asyncio.sleep(0.05)
            while time.monotonic() < end and len(c.events_of("playback_started")) < 2:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            return c, echo_interrupts, t_user

    c, echo_interrupts, t_user = asyncio.run(run())
    assert echo_interrupts == [], "the avatar's own echo interrupted it"
    first = c.events_of("playback_finished")[0]
    assert first["interrupted"], c.events
    # The avatar's speech stopped arriving within 200 ms of the user's first word.
    late = loud_arrivals(c, t_user)
    before_reply = late[late < t_user + 1.0]
    tail = (before_reply.max() - t_user) if len(before_reply) else 0.0
    kinds = [e["type"] for _, e in c.events]
    print(f"barge-in: avatar silent {tail * 1000:.0f} ms after the user started; events {kinds}")
    assert tail <= 0.2, f"avatar still heard {tail * 1000:.0f} ms after the user started"
    # The user's turn was transcribed and answered.
    transcripts = c.events_of("transcript")
    assert transcripts and transcripts[0]["text"] == "What will the weather be tomorrow?"
    assert fake.transcriptions, "no transcription request"
    answer = transcripts[0]["utterance"]
    assert any(e["utterance"] == answer for e in c.events_of("playback_started"))
    assert fake.chats[-1].messages[-1]["content"].endswith("What will the weather be tomorrow?")
