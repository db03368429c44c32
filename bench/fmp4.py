"""fMP4 benchmark (issue #11): ``GET /stream/<id>.mp4`` at a reader on loopback, default model.

- ``first_bytes``: request sent -> first body byte (the init segment), and -> first
  decodable video frame (the first fragment that PyAV decodes a frame from), over
  ``--trials`` requests to a connected, idle session (target <= 400 ms);
- ``reader_cost``: the server's CPU (cores) with 0..``--max_readers`` fMP4 readers of
  one idle session (each reader is one H.264 + AAC encode);
- ``first_speech``: first audio chunk pushed over ``/ws`` -> first speech audio at
  the fMP4 reader (arrival of the bytes that carry it), next to the same
  utterance's first speech at the session's WebRTC peer (RTP packet at aiortc's
  receiver, below its jitter buffer, as bench/live.py measures it).

The helpers (:func:`read_stream`, :func:`received_from_mp4`, :func:`arrival_of`) are
shared with tests/test_fmp4.py and tests/test_record.py.

Usage::

    .venv/bin/python bench/fmp4.py [--trials 10] [--max_readers 4] [--out r.json]
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client import VIDEO_SCALE, AvatarClient, Received, ServerProcess  # noqa: E402

SPEECH_RMS = 0.01  # decoded audio louder than this (-40 dBFS) is speech


@dataclass
class StreamRead:
    """What a reader got from ``GET /stream/<id>.mp4``.

    Attributes:
        status: HTTP status; ``body``: the error body when not 200.
        t_request: monotonic time (s) the request was sent.
        t_first_byte: arrival (s) of the first body byte (None: none came).
        t_first_frame: arrival (s) of the bytes that made the first video frame
            decodable (None unless ``find_first_frame``).
        chunks: (arrival s, total bytes so far) per chunk read.
        data: the body.
    """

    status: int = 0
    body: str = ""
    t_request: float = 0.0
    t_first_byte: float | None = None
    t_first_frame: float | None = None
    chunks: list[tuple[float, int]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


def decodes_a_frame(data: bytes) -> bool:
    """True when PyAV decodes at least one video frame from ``data`` (a stream's start)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            for _ in c.decode(video=0):
                return True
    except (av.error.FFmpegError, IndexError, ValueError):
        pass
    return False


async def read_stream(http, url: str, headers: dict | None = None, seconds: float = 3.0,
                      find_first_frame: bool = False, until=None) -> StreamRead:
    """GET ``url`` with ``http`` (an aiohttp session) and read for ``seconds`` s (or until
    ``until()`` is true, checked per chunk); returns the :class:`StreamRead`."""
    out = StreamRead(t_request=time.monotonic())
    async with http.get(url, headers=headers or {}) as r:
        out.status = r.status
        if r.status != 200:
            out.body = await r.text()
            return out
        end = out.t_request + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or (until is not None and until()):
                break
            try:
                chunk = await asyncio.wait_for(r.content.readany(), left)
            except TimeoutError:
                break
            if not chunk:
                break
            now = time.monotonic()
            if out.t_first_byte is None:
                out.t_first_byte = now
            out.data += chunk
            out.chunks.append((now, len(out.data)))
            if find_first_frame and out.t_first_frame is None and decodes_a_frame(bytes(out.data)):
                out.t_first_frame = now
    return out


def arrival_of(read: StreamRead, byte_end: int) -> float | None:
    """Arrival time (s) of the chunk that completed the first ``byte_end`` bytes."""
    for t, total in read.chunks:
        if total >= byte_end:
            return t
    return None


def received_from_mp4(data: bytes) -> tuple[Received, dict[int, int]]:
    """Decode an MP4 (the stream's bytes, possibly cut mid-fragment) into a
    :class:`client.Received` (media times from the file's pts; video grey at
    VIDEO_SCALE, audio mono float32), so client.av_offset and friends measure it as
    they measure what a WebRTC peer received. Also returns ``{audio pts: byte end of
    its packet}`` (for :func:`arrival_of`)."""
    import av
    import cv2

    rec = Received()
    ends: dict[int, int] = {}
    try:
        with av.open(io.BytesIO(data)) as c:
            for packet in c.demux():
                if packet.stream.type == "audio" and packet.pts is not None and packet.pos is not None:
                    ends[packet.pts] = packet.pos + packet.size
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                for f in frames:
                    if packet.stream.type == "video":
                        if rec.first_frame_bgr is None:
                            rec.first_frame_bgr = f.to_ndarray(format="bgr24")
                        gray = f.to_ndarray(format="gray")
                        rec.video.append(cv2.resize(gray, None, fx=VIDEO_SCALE, fy=VIDEO_SCALE, interpolation=cv2.INTER_AREA))
                        rec.video_t.append(float(f.time))
                    elif packet.stream.type == "audio":
                        pcm = f.to_ndarray().astype(np.float32)
                        rec.audio.append(pcm.mean(axis=0) if pcm.ndim == 2 and not f.format.is_packed else pcm.reshape(-1))
                        rec.audio_t.append(float(f.time))
                        rec.audio_rate = f.sample_rate
    except av.error.FFmpegError:
        pass  # a stream cut mid-fragment ends here
    return rec, ends


def block_rms(rec: Received) -> np.ndarray:
    return np.array([float(np.sqrt(np.mean(a * a))) if len(a) else 0.0 for a in rec.audio])


async def ready(c: AvatarClient) -> None:
    from bench.live import ready as live_ready

    await live_ready(c)


async def bench_first_bytes(url: str, trials: int) -> dict:
    import aiohttp

    first_byte, first_frame = [], []
    async with AvatarClient(url) as c, aiohttp.ClientSession() as http:
        await ready(c)
        for _ in range(trials):
            r = await read_stream(http, f"{url}/stream/{c.sessionid}.mp4", seconds=1.0, find_first_frame=True)
            if r.t_first_byte is not None:
                first_byte.append(r.t_first_byte - r.t_request)
            if r.t_first_frame is not None:
                first_frame.append(r.t_first_frame - r.t_request)
            await asyncio.sleep(0.2)
    from bench.live import stats

    return {"trials": trials, "request_to_first_byte_ms": stats(first_byte),
            "request_to_first_decodable_frame_ms": stats(first_frame), "target_ms": 400}


async def bench_first_speech(url: str, trials: int) -> dict:
    import aiohttp

    from bench.live import FORMATS, quiet, speech_clips, stats

    fmp4, webrtc = [], []
    clips = speech_clips(trials, 1.2)
    async with AvatarClient(url) as c, aiohttp.ClientSession() as http:
        await ready(c)
        for k, pcm in enumerate(clips):
            first_block = len(c.received.audio)
            reader = asyncio.ensure_future(read_stream(http, f"{url}/stream/{c.sessionid}.mp4", seconds=3.5))
            await asyncio.sleep(0.8)  # the reader is streaming idle media
            sent = await c.stream_audio(pcm, **FORMATS["16k_s16le_20ms_raw"])
            await quiet(c, k + 1)
            r = await reader
            rec, ends = received_from_mp4(bytes(r.data))
            loud = np.flatnonzero(block_rms(rec) > SPEECH_RMS)
            if len(loud):
                pts = round(rec.audio_t[loud[0]] * rec.audio_rate)
                end = ends.get(pts)
                t = arrival_of(r, end) if end is not None else None
                if t is not None:
                    fmp4.append(t - sent[0])
            got = c.received
            loud_rtc = [i for i in range(first_block, len(got.audio)) if np.sqrt(np.mean(got.audio[i] ** 2)) > SPEECH_RMS]
            if loud_rtc:
                webrtc.append(got.rtp_arrival(got.audio_t[loud_rtc[0]]) - sent[0])
    return {"trials": trials, "clip_s": 1.2, "input": "16 kHz s16le 20 ms chunks over /ws",
            "fmp4_first_speech_ms": stats(fmp4), "webrtc_first_speech_ms": stats(webrtc)}


async def bench_reader_cost(url: str, pid: int, max_readers: int, seconds: float) -> dict:
    import aiohttp

    from client import cpu_seconds

    cores = []
    async with AvatarClient(url, keep_media=False) as c, aiohttp.ClientSession() as http:
        await ready(c)
        for n in range(max_readers + 1):
            readers = [asyncio.ensure_future(read_stream(http, f"{url}/stream/{c.sessionid}.mp4", seconds=seconds + 1.5))
                       for _ in range(n)]
            await asyncio.sleep(1.0)  # readers started
            t0, cpu0 = time.monotonic(), cpu_seconds(pid)
            await asyncio.sleep(seconds)
            cores.append(round((cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), 3))
            for r in await asyncio.gather(*readers):
                assert r.status == 200
            await asyncio.sleep(0.5)
    slope = float(np.polyfit(np.arange(len(cores)), cores, 1)[0]) if len(cores) > 1 else None
    return {"seconds": seconds, "server_cores_by_readers": cores,
            "per_reader_cores": round(slope, 3) if slope is not None else None}


def main() -> None:
    from bench.common import MEDIA, emit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="first_bytes,first_speech,reader_cost")
    ap.add_argument("--max_readers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0, help="CPU measuring window per reader count")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "model": "default",
        "media": "shared/media/sun.wav" if (MEDIA / "sun.wav").exists() else "espeak speech",
    }
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--model", "default", "--log_level", "WARNING",
                            "--stream_max_readers", str(max(4, args.max_readers)))
        try:
            if "first_bytes" in only:
                out["first_bytes"] = asyncio.run(bench_first_bytes(srv.url, args.trials))
            if "first_speech" in only:
                out["first_speech"] = asyncio.run(bench_first_speech(srv.url, args.trials))
            if "reader_cost" in only:
                out["reader_cost"] = asyncio.run(bench_reader_cost(srv.url, srv.proc.pid, args.max_readers, args.seconds))
        finally:
            srv.stop()
    emit(out, args.out)


if __name__ == "__main__":
    main()
