"""Live-speech benchmark (issue #7) at an aiortc client on loopback, default model.

A producer streams speech over ``/ws`` in real time, as a voice agent's TTS would:

- ``first_audio``: first chunk sent -> first speech audio received, p50/p95 over
  ``--trials`` utterances, for 16 kHz s16le 20 ms raw chunks and for 24 kHz f32le
  40 ms crc32 chunks (target p95 <= 120 ms);
- ``interrupt``: ``{"type": "interrupt"}`` sent -> last speech audio received
  (target p95 <= 100 ms);
- ``playback_started``: the event's arrival minus the arrival of the utterance's
  first audio (target within +-40 ms).

"Received" is where each RTP packet reaches the client's receiver, *below* aiortc's
jitter buffer (``client.Received.rtp_arrival`` taps ``RTCRtpReceiver._handle_rtp_packet``):
what a browser with an adaptive jitter buffer starts from. The figures after aiortc's
own jitter buffer (a fixed 4-packet prefetch) are reported next to them.
Every clip starts on speech (leading quiet cut), so the first chunk is speech.

Usage::

    .venv/bin/python bench/live.py [--only first_audio,interrupt] [--trials 20] [--out r.json]
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

from bench.common import MEDIA, emit, load_speech  # noqa: E402
from client import AvatarClient, ServerProcess  # noqa: E402

SPEECH_RMS = 0.01  # a received 20 ms block louder than this (-40 dBFS) is speech
FORMATS = {
    "16k_s16le_20ms_raw": dict(rate=16000, fmt="s16le", chunk_ms=20, framing="raw"),
    "24k_f32le_40ms_crc32": dict(rate=24000, fmt="f32le", chunk_ms=40, framing="crc32"),
}


def speech_clips(n: int, seconds: float) -> list[np.ndarray]:
    """``n`` clips of ``seconds`` s, each starting on a loud 20 ms chunk, from different
    places of the speech (../shared/media/sun.wav, else espeak)."""
    pcm = load_speech()
    chunks = pcm[: len(pcm) // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((chunks**2).mean(axis=1)) > 3 * SPEECH_RMS)
    span = int(seconds * 16000)
    starts = [int(i) * 320 for i in loud if int(i) * 320 + span <= len(pcm)]
    picks = np.linspace(0, len(starts) - 1, n).astype(int)
    return [pcm[starts[p] : starts[p] + span] for p in picks]


def pct(values, q):
    return round(float(np.percentile(values, q)) * 1000, 1) if len(values) else None


def stats(values) -> dict:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "max": pct(values, 100), "n": len(values)}


def loud_blocks(c: AvatarClient, first: int) -> list[int]:
    rec = c.received
    return [i for i in range(first, len(rec.audio)) if np.sqrt(np.mean(rec.audio[i] ** 2)) > SPEECH_RMS]


async def ready(c: AvatarClient) -> None:
    """Connected, /ws open, and 1 s of idle media received."""
    await asyncio.wait_for(c.first_video.wait(), 20)
    await c.open_ws()
    await asyncio.sleep(1.0)


async def quiet(c: AvatarClient, utterances: int, timeout: float = 15.0) -> None:
    """Wait for the ``utterances``-th playback_finished, then 0.4 s."""
    end = time.monotonic() + timeout
    while len(c.events_of("playback_finished")) < utterances and time.monotonic() < end:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.4)


async def bench_first_audio(url: str, trials: int) -> dict:
    out = {}
    clips = speech_clips(trials, 1.2)
    for name, fmt in FORMATS.items():
        below, after, started = [], [], []
        async with AvatarClient(url) as c:
            await ready(c)
            for k, pcm in enumerate(clips):
                first = len(c.received.audio)
                sent = await c.stream_audio(pcm, **fmt)
                await quiet(c, k + 1)
                loud = loud_blocks(c, first)
                if not loud:
                    continue
                rec = c.received
                below.append(rec.rtp_arrival(rec.audio_t[loud[0]]) - sent[0])
                after.append(rec.audio_arrival[loud[0]] - sent[0])
                t_event, ev = next((t, e) for t, e in c.events
                                   if e["type"] == "playback_started" and e["utterance"] == k + 1)
                started.append(t_event - rec.rtp_arrival(ev["media_time_ms"] / 1000))
        out[name] = {
            "first_speech_audio_ms": stats(below),
            "first_speech_audio_after_aiortc_jitter_buffer_ms": stats(after),
            "playback_started_minus_first_audio_ms": {**stats(started), "min": pct(started, 0)},
        }
    return {"trials": trials, "clip_s": 1.2, **out, "target_first_audio_p95_ms": 120,
            "target_playback_started_abs_ms": 40}


async def bench_interrupt(url: str, trials: int) -> dict:
    clips = speech_clips(trials, 3.0)
    tails, tails_after = [], []
    async with AvatarClient(url) as c:
        await ready(c)
        for k, pcm in enumerate(clips):
            first = len(c.received.audio)
            producer = asyncio.ensure_future(c.stream_audio(pcm, **FORMATS["16k_s16le_20ms_raw"], end=False))
            await asyncio.sleep(1.5)
            t_int = time.monotonic()
            await c.ws.send_json({"type": "interrupt"})
            producer.cancel()
            await quiet(c, k + 1)
            await asyncio.sleep(0.6)
            rec = c.received
            loud = loud_blocks(c, first)
            rtp = [rec.rtp_arrival(rec.audio_t[i]) for i in loud]
            tails.append(max([t - t_int for t in rtp if t > t_int], default=0.0))
            tails_after.append(max([rec.audio_arrival[i] - t_int for i in loud if rec.audio_arrival[i] > t_int], default=0.0))
    return {"trials": trials, "interrupt_to_silence_ms": stats(tails),
            "interrupt_to_silence_after_aiortc_jitter_buffer_ms": stats(tails_after), "target_p95_ms": 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="first_audio,interrupt")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--latency_mode", default="low")
    ap.add_argument("--server_arg", action="append", default=[], help="extra app.py option (repeatable), e.g. --server_arg=-r --server_arg=0")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "latency_mode": args.latency_mode,
        "server_args": args.server_arg,
        "model": "default",
        "media": "shared/media/sun.wav" if (MEDIA / "sun.wav").exists() else "espeak speech",
        "arrival": "RTP packet at the client's receiver, below aiortc's jitter buffer",
    }
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--model", "default", "--latency_mode", args.latency_mode, "--log_level", "WARNING",
                            *args.server_arg)
        try:
            if "first_audio" in only:
                out["first_audio"] = asyncio.run(bench_first_audio(srv.url, args.trials))
            if "interrupt" in only:
                out["interrupt"] = asyncio.run(bench_interrupt(srv.url, max(5, args.trials // 2)))
        finally:
            srv.stop()
    emit(out, args.out)


if __name__ == "__main__":
    main()
