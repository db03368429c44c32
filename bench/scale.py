"""Sessions per machine (issue #10): single-process mode vs workers mode, side by side.

For each mode and each session count N (increasing until a count fails), N
sessions talk at once (each uploads ~40 s of real speech), and over a ``--seconds``
window the server's own counters give, per session: video frames sent (fps),
frames late (> 20 ms after due) and dropped. A count *holds* when every session
sends >= 24.5 fps and late frames are < 1 % of all frames. Also measured: the
server's CPU (the process tree under ``app.py``: front, workers and Ray's own
processes) per session, and first-speech latency (a probe session pushes a 2 s
clip; push -> first speech audio packet at the client, below aiortc's jitter
buffer) at N = 1 and at the largest count that held.

The clients are light so that they do not starve the server on the same machine:
their receivers count RTP packets without decoding (the probe decodes audio only).
``--peer_timeout 0`` because such receivers send no RTCP receiver reports.

Usage::

    .venv/bin/python bench/scale.py [--modes single,workers] [--counts 1,2,4,6,8,10,12] [--seconds 15]
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
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, load_speech  # noqa: E402
from bench.converse import first_loud_arrival  # noqa: E402
from client import AvatarClient, ServerProcess, cpu_seconds  # noqa: E402

FPS_FLOOR = 24.5
LATE_LIMIT = 0.01


class LightClient(AvatarClient):
    """An aiortc client whose receivers count RTP packets instead of decoding them
    (``probe``: audio is still decoded, for first-speech timing)."""

    def __init__(self, url: str, probe: bool = False) -> None:
        super().__init__(url, keep_media=probe)
        self.probe = probe
        self.video_packets = 0

    def _tap_rtp(self, receiver) -> None:
        for r in self.pc.getReceivers():
            if r.track is not None and r.track.kind == "video":
                async def count(packet, arrival_time_ms):
                    self.video_packets += 1
                r._handle_rtp_packet = count
        if self.probe:
            super()._tap_rtp(receiver)
        else:
            async def drop(packet, arrival_time_ms):
                return None
            receiver._handle_rtp_packet = drop


def wav_bytes(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def session_counters(st: dict) -> dict[str, dict]:
    """Per-session counters from /status, in either mode."""
    if "workers" in st:
        out: dict[str, dict] = {}
        for w in st["workers"]:
            out.update((w.get("status") or {}).get("sessions", {}))
        return out
    return st["sessions"]


async def upload(c: AvatarClient, data: bytes) -> float:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("sessionid", c.sessionid)
    form.add_field("file", data, filename="speech.wav", content_type="audio/wav")
    t0 = time.monotonic()
    async with c.http.post(c.base_url + "/humanaudio", data=form) as r:
        body = await r.json()
    if body.get("code") != 0:
        raise RuntimeError(f"upload refused: {body}")
    return t0


async def run_count(url: str, pid: int, n: int, seconds: float, long_speech: bytes, clip: bytes) -> dict:
    clients = [LightClient(url, probe=(i == 0)) for i in range(n)]
    try:
        for c in clients:
            await c.connect()
        await asyncio.sleep(2.0)  # connected, idle media flowing
        for c in clients[1:]:
            await upload(c, long_speech)
        await asyncio.sleep(1.0)
        st0, cpu0, t0 = session_counters(await clients[0].get("/status")), tree_cpu(pid), time.monotonic()
        latencies = []
        end = t0 + seconds
        while time.monotonic() < end - 2.5:
            t_push = await upload(clients[0], clip)
            await asyncio.sleep(2.4)
            arrival = first_loud_arrival(clients[0], t_push)
            if arrival is not None:
                latencies.append((arrival - t_push) * 1000)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        st1, cpu1, t1 = session_counters(await clients[0].get("/status")), tree_cpu(pid), time.monotonic()
    finally:
        for c in clients:
            await c.close()
    window = t1 - t0
    per = []
    for sid, a in st1.items():
        b = st0.get(sid)
        if b is None:
            continue
        sent = a["frames_sent"] - b["frames_sent"]
        per.append({"fps": sent / window, "late": a["frames_late"] - b["frames_late"],
                    "dropped": a["frames_dropped"] - b["frames_dropped"], "sent": sent})
    frames = sum(p["sent"] for p in per) or 1
    late = sum(p["late"] for p in per)
    min_fps = min((p["fps"] for p in per), default=0.0)
    holds = len(per) == n and min_fps >= FPS_FLOOR and late / frames < LATE_LIMIT
    return {"sessions": n, "holds": holds, "min_fps": round(min_fps, 2),
            "mean_fps": round(float(np.mean([p["fps"] for p in per])) if per else 0.0, 2),
            "late_pct": round(100 * late / frames, 2), "dropped": sum(p["dropped"] for p in per),
            "server_cores": round((cpu1 - cpu0) / window, 3),
            "cores_per_session": round((cpu1 - cpu0) / window / n, 3),
            "first_speech_ms": [round(x, 1) for x in latencies]}


async def first_frame_after(url: str) -> float:
    """Seconds from an offer to the first decoded video frame (a full client)."""
    t0 = time.monotonic()
    async with AvatarClient(url, keep_media=False) as c:
        await asyncio.wait_for(c.first_video.wait(), 60)
        return time.monotonic() - t0


def run_mode(mode: str, counts: list[int], seconds: float, long_speech: bytes, clip: bytes, workers: int) -> dict:
    top = max(counts)
    extra = (["--workers", str(workers), "--sessions_per_worker", str(-(-top // workers))] if mode == "workers"
             else ["--workers", "0"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        srv = ServerProcess(Path(tmp), "--model", "default", "--log_level", "WARNING", "--peer_timeout", "0",
                            "--max_session", str(top), "--max_pending", str(top), "--max_pending_per_address",
                            str(top), *extra, timeout=240)
        startup = time.monotonic() - t0
        try:
            first_frame = asyncio.run(first_frame_after(srv.url)) + startup
            time.sleep(3.0)
            idle0, ti = tree_cpu(srv.proc.pid), time.monotonic()
            time.sleep(5.0)
            idle_cores = (tree_cpu(srv.proc.pid) - idle0) / (time.monotonic() - ti)
            rss_mb = sum(_rss_mb(p) for p in process_tree(srv.proc.pid))
            results = []
            for n in counts:
                r = asyncio.run(run_count(srv.url, srv.proc.pid, n, seconds, long_speech, clip))
                print(f"{mode} N={n}: {r}", file=sys.stderr)
                results.append(r)
                if not r["holds"]:
                    break
                time.sleep(1.0)
        finally:
            srv.stop()
    held = [r["sessions"] for r in results if r["holds"]]
    return {"startup_s": round(startup, 1), "start_to_first_frame_s": round(first_frame, 1), "idle_cores": round(idle_cores, 3), "idle_rss_mb": round(rss_mb),
            "max_sessions_holding": max(held) if held else 0, "counts": results}


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="single,workers")
    ap.add_argument("--counts", default="1,2,4,6,8,10,12")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--workers", type=int, default=2, help="worker processes in workers mode")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    speech = load_speech()
    long_speech = wav_bytes(np.tile(speech, int(np.ceil(40 * 16000 / len(speech))))[: 40 * 16000])
    clip = wav_bytes(speech[:32000])
    counts = [int(x) for x in args.counts.split(",")]
    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cpus": os.cpu_count(), "load_before": os.getloadavg()},
                 "model": "default", "seconds": args.seconds, "criteria": {"min_fps": FPS_FLOOR, "late_below": LATE_LIMIT}}
    for mode in args.modes.split(","):
        out[mode] = run_mode(mode, counts, args.seconds, long_speech, clip, args.workers)
    out["machine"]["load_after"] = os.getloadavg()
    emit(out, args.out)


if __name__ == "__main__":
    main()
