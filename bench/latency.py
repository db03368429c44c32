"""Streaming benchmark at an aiortc client on loopback (default model, this machine).

Measures, against the targets of issue #2:

- ``first_audio``: pushed audio -> first speech audio frame received (p50/p95), and
  -> first mouth movement received;
- ``sync``: A/V offset by cross-correlating mouth motion with the received audio
  envelope over ~60 s of speech, per 10 s window (drift = slope of the offsets);
- ``interrupt``: ``/interrupt_talk`` sent -> last speech audio received;
- ``sessions``: how many concurrent sessions hold 25 fps with < 1 % late frames, and
  the CPU cores the server and the clients (decoding every stream) use meanwhile.

Usage::

    .venv/bin/python bench/latency.py [--only first_audio,sync,interrupt,sessions] [--out results.json]

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from audio import decode_audio  # noqa: E402
from client import AvatarClient, ServerProcess, av_offset, mouth_box, mouth_motion, set_audio_prefetch  # noqa: E402

MEDIA = ROOT.parent / "shared" / "media"
SPEECH_RMS = 0.01


def speech_clip(seconds: float | None = None) -> np.ndarray:
    """Real speech at 16 kHz: ../shared/media when present, else espeak."""
    parts = []
    for name in ("yongen.wav", "sun.wav"):
        if (MEDIA / name).exists():
            parts.append(decode_audio((MEDIA / name).read_bytes(), max_seconds=600))
    if not parts:
        from tts import make_tts

        t = make_tts("espeak")
        parts = [t.synthesize("The quick brown fox jumps over the lazy dog. " * 4)]
    pcm = np.concatenate(parts)
    if seconds is not None:
        reps = int(np.ceil(seconds * 16000 / len(pcm)))
        pcm = np.tile(pcm, reps)[: int(seconds * 16000)]
    return pcm


def wav(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="WAV")
    return buf.getvalue()


def first_loud_onset(pcm: np.ndarray) -> float:
    """Seconds into ``pcm`` of its first 20 ms chunk above SPEECH_RMS."""
    chunks = pcm[: len(pcm) // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((chunks**2).mean(axis=1)) > SPEECH_RMS)
    return float(loud[0]) * 0.02 if len(loud) else 0.0


def pct(values, q):
    return round(float(np.percentile(values, q)) * 1000, 1)


async def wait_quiet(c: AvatarClient, extra: float = 0.5) -> None:
    while await c.is_speaking():
        await asyncio.sleep(0.05)
    await asyncio.sleep(extra)


async def bench_first_audio(url: str, trials: int) -> dict:
    clip = speech_clip()[: 16000 * 2]
    onset = first_loud_onset(clip)
    data = wav(clip)
    audio_lat, mouth_lat = [], []
    async with AvatarClient(url) as c:
        await asyncio.wait_for(c.first_video.wait(), 20)
        await asyncio.sleep(1.0)
        box = mouth_box(c.received.first_frame_bgr)
        for _ in range(trials):
            rec = c.received
            na, nv = len(rec.audio), len(rec.video)
            ref = rec.video[-1]
            t0 = time.monotonic()
            await c.push_audio(data)
            while time.monotonic() - t0 < 5:
                await asyncio.sleep(0.005)
                loud = [i for i in range(na, len(rec.audio)) if np.sqrt(np.mean(rec.audio[i] ** 2)) > SPEECH_RMS]
                if loud:
                    audio_lat.append(rec.audio_arrival[loud[0]] - t0 - onset)
                    break
            x1, y1, x2, y2 = box
            for i in range(nv, len(rec.video)):
                if np.abs(rec.video[i][y1:y2, x1:x2].astype(np.float32) - ref[y1:y2, x1:x2]).mean() > 2.0:
                    mouth_lat.append(rec.video_arrival[i] - t0 - onset)
                    break
            await wait_quiet(c)
    return {
        "trials": trials,
        "clip_speech_onset_ms": round(onset * 1000, 1),
        "first_audio_ms": {"p50": pct(audio_lat, 50), "p95": pct(audio_lat, 95), "max": pct(audio_lat, 100)},
        "first_mouth_motion_ms": {"p50": pct(mouth_lat, 50), "p95": pct(mouth_lat, 95)} if mouth_lat else None,
        "target_p95_ms": 150,
    }


async def bench_sync(url: str, seconds: float) -> dict:
    clip = speech_clip(seconds)
    async with AvatarClient(url) as c:
        await asyncio.wait_for(c.first_video.wait(), 20)
        await asyncio.sleep(1.0)
        box = mouth_box(c.received.first_frame_bgr)
        t_start = c.received.video_t[-1]
        await c.push_audio(wav(clip))
        await asyncio.sleep(0.5)
        await wait_quiet(c, 1.0)
        rec = c.received
    t_end = rec.video_t[-1]
    lag, r = av_offset(rec, box, t_range=(t_start, t_end))
    windows = []
    for w0 in np.arange(t_start, t_end - 10, 10.0):
        wl, wr = av_offset(rec, box, t_range=(w0, w0 + 10))
        windows.append({"t_s": round(float(w0 - t_start), 1), "offset_ms": round(wl * 1000, 1), "r": round(wr, 3)})
    slope = float(np.polyfit([w["t_s"] for w in windows], [w["offset_ms"] for w in windows], 1)[0]) if len(windows) > 1 else 0.0
    vt = np.asarray(rec.video_t)
    return {
        "speech_s": round(seconds, 1),
        "offset_ms": round(lag * 1000, 1),
        "correlation": round(r, 3),
        "windows": windows,
        "drift_ms_per_min": round(slope * 60, 2),
        "video_fps_media": round((len(vt) - 1) / (vt[-1] - vt[0]), 3),
        "target_abs_offset_ms": 20,
        "mouth_motion_max": round(float(mouth_motion(rec, box).max()), 2),
    }


async def bench_interrupt(url: str, trials: int) -> dict:
    data = wav(speech_clip(6.0))
    tails = []
    async with AvatarClient(url) as c:
        await asyncio.wait_for(c.first_video.wait(), 20)
        for _ in range(trials):
            rec = c.received
            await c.push_audio(data)
            await asyncio.sleep(1.5)
            t_int = time.monotonic()
            await c.interrupt()
            await asyncio.sleep(1.0)
            arrival = np.asarray(rec.audio_arrival)
            rms = np.array([np.sqrt(np.mean(a * a)) for a in rec.audio])
            loud = arrival[(rms > SPEECH_RMS) & (arrival > t_int)]
            tails.append(float(loud.max() - t_int) if len(loud) else 0.0)
            await wait_quiet(c)
    return {"trials": trials, "interrupt_to_silence_ms": {"p50": pct(tails, 50), "p95": pct(tails, 95), "max": pct(tails, 100)}, "target_ms": 100}


def _session_counters(text: str, sids: list[str]) -> dict[str, float]:
    """Sum of the sent/late/dropped video counters of ``sids`` in a /metrics text."""
    names = {"avatar_video_frames_sent_total": "sent", "avatar_video_frames_late_total": "late",
             "avatar_video_frames_dropped_total": "dropped"}
    out = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names and any(f'session="{sid}"' in line for sid in sids):
            out[names[name]] += float(line.split()[-1])
    return out


async def _metrics(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            return await r.text()


def _cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time (s) of process ``pid`` (None: this process), all threads;
    None where /proc is unavailable."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))


async def _run_sessions(url: str, n: int, seconds: float, warmup: float, data: bytes,
                        server_pid: int | None = None) -> dict:
    clients = [AvatarClient(url, keep_media=False) for _ in range(n)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        await asyncio.gather(*(asyncio.wait_for(c.first_video.wait(), 30) for c in clients))
        sids = [c.sessionid for c in clients]

        async def talk(c: AvatarClient, until: float) -> None:
            while time.monotonic() < until:
                if not await c.is_speaking():
                    await c.push_audio(data)
                await asyncio.sleep(0.2)

        await asyncio.gather(*(talk(c, time.monotonic() + warmup) for c in clients))
        startup = _session_counters(await _metrics(url), sids)
        counts0 = [len(c.received.video_t) for c in clients]
        cpu0 = (_cpu_seconds(server_pid) if server_pid else None, _cpu_seconds())
        t0 = time.monotonic()
        await asyncio.gather(*(talk(c, t0 + seconds) for c in clients))
        elapsed = time.monotonic() - t0
        cpu1 = (_cpu_seconds(server_pid) if server_pid else None, _cpu_seconds())
        end = _session_counters(await _metrics(url), sids)
        fps = [(len(c.received.video_t) - k) / elapsed for c, k in zip(clients, counts0)]
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    steady = {k: end[k] - startup[k] for k in end}
    bad = steady["late"] + steady["dropped"]
    return {
        "sessions": n,
        "min_fps": round(min(fps), 2),
        "late_or_dropped_pct": round(100.0 * bad / max(steady["sent"] + steady["dropped"], 1), 2),
        "startup_late_or_dropped_frames": int(startup["late"] + startup["dropped"]),
        # CPU cores busy during the steady state: the server process, and this
        # process (the aiortc clients receiving and decoding every stream)
        "server_cores": round((cpu1[0] - cpu0[0]) / elapsed, 2) if cpu0[0] is not None and cpu1[0] is not None else None,
        "client_cores": round((cpu1[1] - cpu0[1]) / elapsed, 2),
    }


async def bench_sessions(url: str, max_n: int, seconds: float, warmup: float = 3.0, min_n: int = 1,
                         server_pid: int | None = None) -> dict:
    """Steady state after ``warmup`` s of talking: every session talks all the time."""
    data = wav(speech_clip(4.0))
    rows, best = [], 0
    for n in range(min_n, max_n + 1):
        row = await _run_sessions(url, n, seconds, warmup, data, server_pid)
        row["ok"] = row["min_fps"] >= 24.5 and row["late_or_dropped_pct"] < 1.0
        rows.append(row)
        if not row["ok"]:
            break
        best = n
        await asyncio.sleep(2.0)
    return {"per_n": rows, "max_sessions_25fps": best, "target": 4, "seconds_each": seconds, "warmup_s": warmup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="first_audio,sync,interrupt,sessions")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sync_seconds", type=float, default=60.0)
    ap.add_argument("--max_sessions", type=int, default=8)
    ap.add_argument("--min_sessions", type=int, default=1, help="first session count tried")
    ap.add_argument("--session_seconds", type=float, default=20.0)
    ap.add_argument("--latency_mode", default="low")
    ap.add_argument("--client_audio_prefetch", type=int, default=4,
                    help="packets aiortc's audio jitter buffer holds back (aiortc default 4 = 80 ms)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.client_audio_prefetch != 4:
        set_audio_prefetch(args.client_audio_prefetch)
    only = set(args.only.split(","))
    out: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "latency_mode": args.latency_mode,
        "client_audio_prefetch_packets": args.client_audio_prefetch,
        "model": "default",
        "media": "shared/media speech" if MEDIA.exists() else "espeak speech",
    }
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--model", "default", "--latency_mode", args.latency_mode,
                            "--max_session", str(max(args.max_sessions, 2)), "--log_level", "WARNING")
        try:
            if "first_audio" in only:
                out["first_audio"] = asyncio.run(bench_first_audio(srv.url, args.trials))
            if "sync" in only:
                out["sync"] = asyncio.run(bench_sync(srv.url, args.sync_seconds))
            if "interrupt" in only:
                out["interrupt"] = asyncio.run(bench_interrupt(srv.url, max(5, args.trials // 2)))
            if "sessions" in only:
                out["sessions"] = asyncio.run(bench_sessions(srv.url, args.max_sessions, args.session_seconds, min_n=args.min_sessions,
                                                          server_pid=srv.proc.pid))
        finally:
            srv.stop()
    emit(out, args.out)


if __name__ == "__main__":
    main()
