"""Egress benchmark (issue #11): what an audience costs, WHEP viewers vs Janus fan-out,
and the latency of each path.

- ``viewers``: the server's CPU (cores, from /proc over ``--seconds``) with one
  session and 0..``--max_viewers`` WHEP viewers (each an encode of its own), and
  the same audience as Janus VideoRoom subscribers of the session published once
  (``POST /janus``); Janus' own CPU next to it. Per-viewer cost = least-squares
  slope over the audience sizes. The avatar is idle (its breathing loop) while
  measured, every receiver counts frames only (``keep_media=False``).
- ``first_speech``: a speech clip streamed over ``/ws`` in real time -> its first
  speech audio packet (below aiortc's jitter buffer, as bench/live.py) at the
  session's own WebRTC peer, at a WHEP viewer and at a Janus subscriber, all in the
  same trials.

The Janus parts need Debian's ``janus`` (skipped without it). The server listens
beyond loopback (with an API key) because Janus offers no loopback candidates.
Receivers run in this process on the same machine: note its load (``uptime``).

Usage::

    .venv/bin/python bench/egress.py [--only viewers,first_speech] [--max_viewers 4] [--seconds 6] \\
        [--trials 10] [--out bench/results/egress.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MEDIA, emit  # noqa: E402
from bench.live import loud_blocks, quiet, ready, speech_clips, stats  # noqa: E402
from client import AvatarClient, JanusViewer, ServerProcess, WhepViewer, cpu_seconds, free_port  # noqa: E402

KEY = "egress-bench"
SETTLE_S = 1.5  # after an audience change, before measuring


async def cpu_over(pids: list[int], seconds: float) -> list[float]:
    """Cores' worth of CPU each process used over the next ``seconds``."""
    c0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
    await asyncio.sleep(seconds)
    dt = time.monotonic() - t0
    return [round((cpu_seconds(p) - c) / dt, 3) for p, c in zip(pids, c0)]


def fps(c: AvatarClient, since: float) -> float:
    t = [a for a in c.received.video_arrival if a >= since]
    return round((len(t) - 1) / (t[-1] - t[0]), 2) if len(t) > 1 else 0.0


def slope(xs, ys) -> float:
    return round(float(np.polyfit(xs, ys, 1)[0]), 3) if len(xs) > 1 else 0.0


async def bench_viewers(srv: ServerProcess, janus, max_viewers: int, seconds: float) -> dict:
    out: dict = {}
    async with AvatarClient(srv.url, keep_media=False, api_key=KEY) as peer:
        await asyncio.wait_for(peer.first_video.wait(), 20)
        await asyncio.sleep(SETTLE_S)
        rows = []
        viewers: list[WhepViewer] = []
        for n in range(max_viewers + 1):
            if n:
                v = WhepViewer(srv.url, peer.sessionid, peer.token, keep_media=False)
                await v.connect()
                await asyncio.wait_for(v.first_video.wait(), 20)
                viewers.append(v)
                await asyncio.sleep(SETTLE_S)
            since = time.monotonic()
            (cpu,) = await cpu_over([srv.proc.pid], seconds)
            rows.append({"viewers": n, "server_cpu_cores": cpu, "viewer_fps": [fps(v, since) for v in viewers]})
        for v in viewers:
            await v.close()
        out["whep"] = {"rows": rows, "per_viewer_cpu_cores": slope([r["viewers"] for r in rows],
                                                                   [r["server_cpu_cores"] for r in rows])}
        if janus is None:
            out["janus"] = "skipped: janus not installed (apt-get install janus)"
            return out
        await asyncio.sleep(SETTLE_S)
        token, peer.token = peer.token, None  # /janus takes the API key
        published = await peer.post("/janus", {"sessionid": peer.sessionid})
        peer.token = token
        if published.get("code") != 0:
            out["janus"] = f"publish failed: {published.get('msg')}"
            return out
        rows = []
        subs: list[JanusViewer] = []
        for n in range(max_viewers + 1):
            if n:
                s = JanusViewer(srv.url, janus.url, published["room"], published["feed"], keep_media=False)
                await s.connect()
                await asyncio.wait_for(s.first_video.wait(), 20)
                subs.append(s)
            await asyncio.sleep(SETTLE_S)
            since = time.monotonic()
            cpu, janus_cpu = await cpu_over([srv.proc.pid, janus.proc.pid], seconds)
            rows.append({"subscribers": n, "server_cpu_cores": cpu, "janus_cpu_cores": janus_cpu,
                         "subscriber_fps": [fps(s, since) for s in subs]})
        for s in subs:
            await s.close()
        peer.token = None
        await peer.post("/janus", {"sessionid": peer.sessionid, "stop": True})
        out["janus"] = {"rows": rows,
                        "per_subscriber_server_cpu_cores": slope([r["subscribers"] for r in rows],
                                                                 [r["server_cpu_cores"] for r in rows]),
                        "per_subscriber_janus_cpu_cores": slope([r["subscribers"] for r in rows],
                                                                [r["janus_cpu_cores"] for r in rows]),
                        # the one publication's encode: published with no subscriber vs no publication
                        "publish_cost_cpu_cores": round(rows[0]["server_cpu_cores"]
                                                        - out["whep"]["rows"][0]["server_cpu_cores"], 3)}
    return out


async def bench_first_speech(srv: ServerProcess, janus, trials: int) -> dict:
    clips = speech_clips(trials, 1.2)
    fmt = dict(rate=16000, fmt="s16le", chunk_ms=20, framing="raw")
    paths: dict[str, list[float]] = {"webrtc": [], "whep": [], "janus": []}
    async with AvatarClient(srv.url, api_key=KEY) as peer:
        await ready(peer)
        receivers = {"webrtc": peer}
        receivers["whep"] = WhepViewer(srv.url, peer.sessionid, peer.token)
        await receivers["whep"].connect()
        if janus is not None:
            token, peer.token = peer.token, None
            published = await peer.post("/janus", {"sessionid": peer.sessionid})
            peer.token = token
            receivers["janus"] = JanusViewer(srv.url, janus.url, published["room"], published["feed"])
            await receivers["janus"].connect()
        for c in receivers.values():
            await asyncio.wait_for(c.first_video.wait(), 20)
        await asyncio.sleep(1.0)
        for k, pcm in enumerate(clips):
            first = {name: len(c.received.audio) for name, c in receivers.items()}
            sent = await peer.stream_audio(pcm, **fmt)
            await quiet(peer, k + 1)
            await asyncio.sleep(0.3)
            for name, c in receivers.items():
                loud = loud_blocks(c, first[name])
                if loud:
                    paths[name].append(c.received.rtp_arrival(c.received.audio_t[loud[0]]) - sent[0])
        for name, c in receivers.items():
            if c is not peer:
                await c.close()
    return {"trials": trials, "clip": "1.2 s, 16 kHz s16le 20 ms raw chunks over /ws",
            "first_speech_audio_ms": {name: stats(v) if v else "skipped (janus not installed)"
                                      for name, v in paths.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="viewers,first_speech")
    ap.add_argument("--max_viewers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="CPU measuring window per audience size")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "model": "default",
        "media": "shared/media/sun.wav" if (MEDIA / "sun.wav").exists() else "espeak speech",
    }
    with tempfile.TemporaryDirectory() as tmp:
        janus = None
        if shutil.which("janus"):
            from janus import JanusProcess

            janus = JanusProcess(Path(tmp), free_port())
        args_janus = ["--janus_url", janus.url] if janus else []
        srv = ServerProcess(Path(tmp), "--model", "default", "--log_level", "WARNING", "--listen", "0.0.0.0",
                            "--api_key", KEY, "--max_viewers", str(max(args.max_viewers, 1)), *args_janus)
        try:
            if "viewers" in only:
                out["viewers"] = asyncio.run(bench_viewers(srv, janus, args.max_viewers, args.seconds))
            if "first_speech" in only:
                out["first_speech"] = asyncio.run(bench_first_speech(srv, janus, args.trials))
        finally:
            srv.stop()
            if janus is not None:
                janus.stop()
    out["machine"]["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    emit(out, args.out)


if __name__ == "__main__":
    main()
