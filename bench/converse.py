"""Conversation benchmark (issue #9) at an aiortc client on loopback, default model.

- ``text``: ``/human`` echo of a 10-word sentence -> first speech audio received
  (target p95 <= 300 ms); the TTS time for that sentence is measured separately.
- ``chat``: ``/human`` chat against a fake OpenAI-compatible LLM whose first token
  comes after ``--first_token_ms`` -> first speech audio, minus that delay (target
  p95 <= 300 ms).
- ``turn``: converse mode, the user (the client's microphone) stops speaking -> the
  avatar's first speech, with its parts: end of turn + speech-to-text (-> the
  ``transcript`` event), LLM + TTS + model + playout (-> ``playback_started``),
  network (-> the first audio packet). The fake STT answers at once; the fake LLM
  after ``--first_token_ms``.
- ``barge_in``: the user starts talking while the avatar speaks -> the avatar's
  last speech audio (target p95 <= 100 ms).

"Received" is the RTP packet's arrival below aiortc's jitter buffer (see bench/live.py).

Usage::

    .venv/bin/python bench/converse.py [--only text,chat,turn,barge_in] [--trials 20] [--tts piper]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import emit, load_speech  # noqa: E402
from bench.live import ready  # noqa: E402
from client import AvatarClient, MicrophoneTrack, ServerProcess  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402

SPEECH_RMS = 0.01
SENTENCE = "Please tell me how the weather will be later this afternoon."  # 10 words
STORY = " ".join(f"This is sentence number {n} of a long story that the avatar tells." for n in range(1, 40))


def stats(values) -> dict:
    v = np.asarray(values, float) * 1000
    if not len(v):
        return {"n": 0}
    return {"p50": round(float(np.percentile(v, 50)), 1), "p95": round(float(np.percentile(v, 95)), 1),
            "max": round(float(v.max()), 1), "n": len(v)}


def first_loud_arrival(c: AvatarClient, since: float) -> float | None:
    rec = c.received
    for t, a in zip(rec.audio_t, rec.audio):
        if np.sqrt(np.mean(a * a)) > SPEECH_RMS:
            arrival = rec.rtp_arrival(t)
            if arrival is not None and arrival > since:
                return arrival
    return None


async def wait_event(c: AvatarClient, kind: str, n: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while len(c.events_of(kind)) < n and time.monotonic() < end:
        await asyncio.sleep(0.01)


async def settle(c: AvatarClient) -> None:
    await c.interrupt()
    await asyncio.sleep(0.8)


async def bench_text(url: str, trials: int, tts_name: str) -> dict:
    from tts import make_tts

    engine = make_tts(tts_name)
    engine.synthesize(SENTENCE)
    synth = []
    for _ in range(trials):
        t0 = time.perf_counter()
        engine.synthesize(SENTENCE)
        synth.append(time.perf_counter() - t0)
    lat = []
    async with AvatarClient(url) as c:
        await ready(c)
        for k in range(trials):
            t0 = time.monotonic()
            await c.say(SENTENCE)
            await wait_event(c, "playback_finished", k + 1)
            arrival = first_loud_arrival(c, t0)
            if arrival is not None:
                lat.append(arrival - t0)
            await asyncio.sleep(0.3)
    return {"sentence": SENTENCE, "tts": tts_name, "text_to_first_speech_ms": stats(lat),
            "tts_sentence_ms": stats(synth), "target_p95_ms": 300}


async def bench_chat(url: str, trials: int, first_token_s: float) -> dict:
    lat = []
    async with AvatarClient(url) as c:
        await ready(c)
        for k in range(trials):
            t0 = time.monotonic()
            r = await c.post("/human", {"sessionid": c.sessionid, "text": "Hello?", "type": "chat"})
            await wait_event(c, "playback_started", k + 1)
            await asyncio.sleep(1.0)
            arrival = first_loud_arrival(c, t0)
            if arrival is not None and r["code"] == 0:
                lat.append(arrival - t0 - first_token_s)
            await settle(c)
    return {"first_token_delay_ms": first_token_s * 1000, "chat_to_first_speech_minus_first_token_ms": stats(lat),
            "target_p95_ms": 300}


async def bench_turn(url: str, trials: int, question: np.ndarray) -> dict:
    totals, to_transcript, to_started, to_audio = [], [], [], []
    c = AvatarClient(url)
    mic = MicrophoneTrack(c.received)
    c.mic_track, c.mic_mode = mic.track, "converse"
    async with c:
        await ready(c)
        for k in range(trials):
            mic.say(question)
            while mic.speech_started_at is None:
                await asyncio.sleep(0.005)
            t_stop = mic.speech_started_at + len(question) / 16000
            await wait_event(c, "transcript", k + 1)
            await wait_event(c, "playback_started", k + 1)
            await asyncio.sleep(1.0)
            t_transcript = next(t for t, e in reversed(c.events) if e["type"] == "transcript")
            t_started = next(t for t, e in reversed(c.events) if e["type"] == "playback_started")
            arrival = first_loud_arrival(c, t_stop)
            if arrival is not None:
                totals.append(arrival - t_stop)
                to_transcript.append(t_transcript - t_stop)
                to_started.append(t_started - t_transcript)
                to_audio.append(arrival - t_started)
            await settle(c)
    return {"question_s": round(len(question) / 16000, 2), "user_stops_to_first_speech_ms": stats(totals),
            "parts_ms": {"end_of_turn_and_stt (-> transcript)": stats(to_transcript),
                         "llm_tts_model_playout (-> playback_started)": stats(to_started),
                         "speech_sent_to_first_audio_packet": stats(to_audio)}}


async def avatar_loud_now(c: AvatarClient, timeout: float = 3.0) -> None:
    """Return once the newest audio frame decoded is speech (it left aiortc's jitter
    buffer ~80 ms after it arrived: the avatar is most likely still in that word)."""
    rec, end = c.received, time.monotonic() + timeout
    n = len(rec.audio)
    while time.monotonic() < end:
        if len(rec.audio) > n and np.sqrt(np.mean(rec.audio[-1] ** 2)) > 3 * SPEECH_RMS:
            return
        await asyncio.sleep(0.005)


async def bench_barge_in(url: str, trials: int, interjection: np.ndarray, echo_gain: float) -> dict:
    tails, skipped, trial_log = [], 0, []
    c = AvatarClient(url)
    mic = MicrophoneTrack(c.received, echo_gain=echo_gain, echo_delay=0.08)
    c.mic_track, c.mic_mode = mic.track, "converse"
    async with c:
        await ready(c)
        for _ in range(trials):
            n = len(c.events_of("playback_started"))
            await c.post("/human", {"sessionid": c.sessionid, "text": "Tell me a story.", "type": "chat"})
            await wait_event(c, "playback_started", n + 1)
            await asyncio.sleep(1.5)
            await avatar_loud_now(c)  # talk over a word, not into a pause between pieces
            mic.say(interjection)
            while mic.speech_started_at is None:
                await asyncio.sleep(0.005)
            t_user = mic.speech_started_at
            await asyncio.sleep(0.6)
            rec = c.received
            loud = [rec.rtp_arrival(t) for t, a in zip(rec.audio_t, rec.audio) if np.sqrt(np.mean(a * a)) > SPEECH_RMS]
            before = [t for t in loud if t is not None and t_user - 0.5 < t < t_user]
            after = [t for t in loud if t is not None and t_user < t < t_user + 0.6]
            if not before:  # the avatar was not speaking when the user started: no trial
                skipped += 1
                trial_log.append({"skipped": True, "events": [(round(t - t_user, 2), e["type"], e.get("interrupted"))
                                                              for t, e in c.events if t > t_user - 2.5]})
                continue
            tails.append(max(after) - t_user if after else 0.0)
            trial_log.append({"tail_ms": round(tails[-1] * 1000, 1),
                              "events": [(round(t - t_user, 2), e["type"]) for t, e in c.events if t > t_user - 2.5]})
            await asyncio.sleep(2.5)  # the interjection is answered; then quiet
            await settle(c)
    return {"barge_in_to_silence_ms": stats(tails), "trials_avatar_not_speaking": skipped,
            "echo_gain": echo_gain, "target_p95_ms": 100, "trials": trial_log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="text,chat,turn,barge_in")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tts", default="piper")
    ap.add_argument("--first_token_ms", type=float, default=200.0)
    ap.add_argument("--echo_gain", type=float, default=0.18, help="the avatar's voice fed back into the mic (0.18 = -15 dB)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    speech = load_speech()
    levels = np.sqrt((speech[: len(speech) // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1))
    start = int(np.flatnonzero(levels > 0.02)[0]) * 320
    question, interjection = speech[start : start + 32000], speech[start : start + 24000]
    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
                 "model": "default", "latency_mode": "low", "tts": args.tts,
                 "arrival": "RTP packet at the client's receiver, below aiortc's jitter buffer"}
    first_token = args.first_token_ms / 1000
    with FakeOpenAI(reply=STORY, first_token_delay=first_token, token_delay=0.01,
                    transcript="What will the weather be tomorrow?") as fake, tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--model", "default", "--log_level", "WARNING", "--tts", args.tts,
                            "--llm_url", fake.url, "--llm_model", "fake", "--stt", "openai", "--stt_url", fake.url)
        try:
            if "text" in only:
                out["text"] = asyncio.run(bench_text(srv.url, args.trials, args.tts))
            if "chat" in only:
                out["chat"] = asyncio.run(bench_chat(srv.url, args.trials, first_token))
            if "turn" in only:
                out["turn"] = asyncio.run(bench_turn(srv.url, max(5, args.trials // 2), question))
            if "barge_in" in only:
                out["barge_in"] = asyncio.run(bench_barge_in(srv.url, args.trials, interjection, args.echo_gain))
        finally:
            srv.stop()
    emit(out, args.out)


if __name__ == "__main__":
    main()
