"""Soak and dead-peer benchmarks (issue #8), against app.py on loopback, default model.

- ``soak``: ``--sessions`` (4) aiortc clients talk continuously for ``--minutes`` (30):
  each streams speech over ``/ws`` in real time, utterance after utterance. Every
  ``--sample_s`` (10 s) the server's RSS, threads and open file descriptors are
  sampled with its late/dropped/sent video frames (``/metrics``); one client keeps its
  media and the A/V offset is measured on each minute of it. Targets: memory flat
  (< 2 % growth after the first 5 minutes), no drift, < 0.5 % late frames.
- ``dead_peer``: ``--kills`` (20) times, a client in its own process connects and is
  killed with SIGKILL; the time until the server has closed its session (``/status``)
  is the detection time. Target p95 <= 5 s.

Usage::

    .venv/bin/python bench/soak.py --only soak --minutes 30 --out bench/results/soak.json
    .venv/bin/python bench/soak.py --only dead_peer --kills 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, load_speech  # noqa: E402
from client import AvatarClient, ServerProcess, av_offset, mouth_box  # noqa: E402


def proc_stats(pid: int) -> dict:
    """RSS (MB), threads and open fds of process ``pid`` (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def frame_counters(url: str) -> dict:
    """Sum over sessions of the video frame counters in /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out = {"sent": 0.0, "late": 0.0, "dropped": 0.0}
    names = {"avatar_video_frames_sent_total": "sent", "avatar_video_frames_late_total": "late",
             "avatar_video_frames_dropped_total": "dropped"}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def trim(c: AvatarClient, keep_s: float) -> None:
    """Forget received media older than ``keep_s`` seconds (bounded client memory)."""
    rec = c.received
    for t_list, lists in ((rec.video_t, (rec.video, rec.video_arrival)), (rec.audio_t, (rec.audio, rec.audio_arrival))):
        if not t_list:
            continue
        cut = int(np.searchsorted(np.asarray(t_list), t_list[-1] - keep_s))
        if cut > 0:
            del t_list[:cut]
            for lst in lists:
                del lst[:cut]


async def talk(c: AvatarClient, clip: np.ndarray, until: float) -> None:
    await c.open_ws()
    while time.monotonic() < until:
        await c.stream_audio(clip)
        await asyncio.sleep(0.3)


async def bench_soak(srv: ServerProcess, sessions: int, minutes: float, sample_s: float) -> dict:
    clip = load_speech()[: 16000 * 20]
    until = time.monotonic() + minutes * 60
    clients = [AvatarClient(srv.url, keep_media=(i == 0)) for i in range(sessions)]
    for c in clients:
        await c.connect()
        await asyncio.wait_for(c.first_video.wait(), 20)
    box = mouth_box(clients[0].received.first_frame_bgr)
    await asyncio.sleep(1.0)
    idle = clients[0].received.video[-1].copy()  # the closed mouth, before anyone talks: motion is measured from it
    talkers = [asyncio.ensure_future(talk(c, clip, until)) for c in clients]
    samples, offsets = [], []
    t0, f0, next_minute = time.monotonic(), frame_counters(srv.url), 60.0
    while time.monotonic() < until:
        await asyncio.sleep(sample_s)
        f = frame_counters(srv.url)
        elapsed = time.monotonic() - t0
        sample = {"t_s": round(elapsed, 1), **proc_stats(srv.proc.pid),
                  **{k: int(f[k] - f0[k]) for k in f}}
        samples.append(sample)
        if elapsed >= next_minute:
            rec = clients[0].received
            lag, r = av_offset(rec, box, t_range=(rec.video_t[-1] - 55, rec.video_t[-1] - 1), reference=idle)
            offsets.append({"minute": round(elapsed / 60), "offset_ms": round(lag * 1000, 1), "r": round(r, 3)})
            next_minute += 60.0
        trim(clients[0], 70.0)
    await asyncio.gather(*talkers, return_exceptions=True)
    for c in clients:
        await c.close()
    after5 = [s for s in samples if s["t_s"] >= 300] or samples
    last = samples[-1]
    late_pct = 100.0 * last["late"] / max(1, last["sent"])
    dropped_pct = 100.0 * last["dropped"] / max(1, last["sent"] + last["dropped"])
    slope = float(np.polyfit([o["minute"] for o in offsets], [o["offset_ms"] for o in offsets], 1)[0]) if len(offsets) > 1 else 0.0
    return {
        "sessions": sessions, "minutes": minutes, "sample_s": sample_s,
        "rss_growth_after_5min_pct": round(100.0 * (after5[-1]["rss_mb"] - after5[0]["rss_mb"]) / after5[0]["rss_mb"], 2),
        "rss_mb_first_last": [samples[0]["rss_mb"], last["rss_mb"]],
        "threads_first_last": [samples[0]["threads"], last["threads"]],
        "fds_first_last": [samples[0]["fds"], last["fds"]],
        "late_pct": round(late_pct, 3), "dropped_pct": round(dropped_pct, 3),
        "av_offset_per_minute": offsets, "offset_drift_ms_per_min": round(slope, 2),
        "samples": samples,
        "targets": {"rss_growth_after_5min_pct": 2.0, "late_pct": 0.5, "drift": "none"},
    }


CLIENT = """
import asyncio, sys
sys.path.insert(0, {root!r})
from client import AvatarClient
async def main():
    c = AvatarClient({url!r}, keep_media=False)
    await c.connect()
    await asyncio.wait_for(c.first_video.wait(), 20)
    print(c.sessionid, flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def status(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/status", timeout=5).read())


def bench_dead_peer(srv: ServerProcess, kills: int) -> dict:
    times = []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", CLIENT.format(root=str(ROOT), url=srv.url)],
                                stdout=subprocess.PIPE, text=True)
        sid = proc.stdout.readline().strip()[:8]
        time.sleep(1.0)  # a connected, streaming peer
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t_kill = time.monotonic()
        while sid in status(srv.url)["sessions"] and time.monotonic() - t_kill < 60:
            time.sleep(0.05)  # polling the server from outside
        times.append(time.monotonic() - t_kill)
    return {"kills": kills, "detect_s": {"p50": round(float(np.percentile(times, 50)), 2),
                                         "p95": round(float(np.percentile(times, 95)), 2),
                                         "max": round(max(times), 2)},
            "closed": status(srv.url)["closed"], "target_p95_s": 5.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="soak,dead_peer")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--sample_s", type=float, default=10.0)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
                 "model": "default", "latency_mode": "low"}
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--model", "default", "--log_level", "WARNING")
        try:
            if "dead_peer" in only:
                out["dead_peer"] = bench_dead_peer(srv, args.kills)
            if "soak" in only:
                out["soak"] = asyncio.run(bench_soak(srv, args.sessions, args.minutes, args.sample_s))
        finally:
            srv.stop()
    emit(out, args.out)


if __name__ == "__main__":
    main()
