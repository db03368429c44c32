"""Video encode cost per stream: aiortc's VP8 vs H.264 encoders on the avatar's frames.

The server sends each session's video through aiortc, which encodes every frame
with ``aiortc.codecs.vpx.Vp8Encoder`` or ``aiortc.codecs.h264.H264Encoder`` (the
one negotiated first) in the event loop's default thread pool
(``RTCRtpSender._next_encoded_frame``: ``loop.run_in_executor(None, encoder.encode,
...)``). This script feeds the same encoder classes, at aiortc's own starting
bitrates (VP8 500 kbit/s, H.264 1 Mbit/s: ``DEFAULT_BITRATE`` in each module;
REMB moves them later), the frames the server sends for the embedded default
avatar talking: the default avatar (512x512) with the default model's mouth
(``visememodel.VisemeWarpModel``, the ``low`` preset's context) driven by real
speech (``bench.common.load_speech``), composited and converted to I420 as the
compositing thread does (``basereal``), with the tracks' pts.

Per codec:

- ``single``: one stream, ``--frames`` frames encoded back to back: wall ms per
  frame (mean, p95; the first frame, which opens the codec and is a key frame, is
  reported apart as ``first_frame_ms``), CPU ms per frame of the calling thread
  (``time.thread_time``; libvpx runs there) and of the whole process
  (``time.process_time``; includes libx264's own worker threads), and RTP payload
  bytes per second at 25 fps;
- ``concurrent``: ``--streams`` streams, one thread and one encoder each (as a
  server with that many sessions encodes in its thread pool), started together:
  the same per-frame figures, the wall time of the whole batch, the cores used
  (process CPU / wall: above 1 means the encoders run in parallel, i.e. the GIL is
  released while encoding) and ``streams_at_25fps``: how many 25 fps streams the
  measured throughput would hold on this machine as loaded at the time;
- ``concurrent_one_core``: the same streams with the process pinned to one CPU
  (``os.sched_setaffinity``; threads inherit it), and ``scaling``: throughput on
  all CPUs / on one. Near 1: the encoders are serialised (by the GIL, or by other
  work holding the other cores); towards the number of free cores: they run in
  parallel. PyAV encodes without the GIL (``av/codec/context.py``,
  ``_send_frame_and_recv``: ``avcodec_send_frame`` under ``nogil``); only
  aiortc's packetisation and PyAV's wrapping hold it: ``gil_held_cpu_ms`` is the
  calling thread's CPU per frame outside libavcodec's encode (the codec context
  is wrapped to time its ``encode``), ``streams_per_gil`` the 25 fps streams one
  process could encode if its encoders held the GIL only for that, and
  ``streams_per_core`` the streams one core holds at the process CPU per frame.
  Whichever is lower limits a process first; the wall figures also carry the
  machine's other load.

Usage::

    .venv/bin/python bench/codec.py [--frames 250] [--streams 4] [--codecs vp8,h264] [--out codec.json]

Prints one JSON object (also written to ``--out``), with ``uptime`` before and
after: other work on the machine inflates the wall figures, not the CPU ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, load_speech  # noqa: E402
from clock import CHUNK_MS, FRAME_SAMPLES, VIDEO_FPS, VIDEO_TIME_BASE, video_pts  # noqa: E402

LOOKBEHIND_CHUNKS = 2  # the `low` preset's l (config.LATENCY_PRESETS)
LOOKAHEAD_CHUNKS = 0  # the `low` preset's r


def avatar_frames(n: int, avatars_dir: Path, speech_path: Path | None = None) -> tuple[list[np.ndarray], dict]:
    """``n`` I420 frames (uint8 (H * 3 // 2, W)) of the default avatar talking.

    Returns (frames, info): info has the size, the share of frames with a generated
    mouth and the mean absolute change between consecutive frames (grey levels), so
    the result shows the frames move (a still image would encode to almost nothing).
    """
    import avatar as avatar_mod
    from visememodel import VisemeWarpModel

    avatar = avatar_mod.ensure_default_avatar(avatars_dir)
    model = VisemeWarpModel(avatar, lookahead_ms=LOOKAHEAD_CHUNKS * CHUNK_MS, lookbehind_ms=LOOKBEHIND_CHUNKS * CHUNK_MS)
    speech = load_speech(speech_path)
    before = LOOKBEHIND_CHUNKS * FRAME_SAMPLES // 2
    after = LOOKAHEAD_CHUNKS * FRAME_SAMPLES // 2
    need = n * FRAME_SAMPLES
    if len(speech) < need:
        speech = np.tile(speech, need // len(speech) + 1)
    padded = np.concatenate([np.zeros(before, np.float32), speech[:need].astype(np.float32), np.zeros(after, np.float32)])
    frames, mouths = [], 0
    for s in range(n):
        window = padded[s * FRAME_SAMPLES : s * FRAME_SAMPLES + before + FRAME_SAMPLES + after]
        patch = model.infer(model.features(window)[None], [s])[0]
        if patch is None:
            frames.append(avatar.frame_i420(s))
        else:
            mouths += 1
            frames.append(avatar_mod.to_i420(avatar.composite(s, patch)))
    change = float(np.mean([np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))) for a, b in zip(frames, frames[1:])]))
    w, h = avatar.size
    return frames, {"width": w, "height": h, "frames": n, "mouth_frames": mouths,
                    "mean_abs_change_per_frame": round(change, 3)}


def make_encoder(codec: str):
    """A fresh aiortc encoder for ``codec`` ('vp8' or 'h264') at aiortc's start bitrate."""
    if codec == "vp8":
        from aiortc.codecs.vpx import Vp8Encoder

        return Vp8Encoder()
    if codec == "h264":
        from aiortc.codecs.h264 import H264Encoder

        return H264Encoder()
    raise ValueError(f"unknown codec {codec!r}")


class _TimedCodec:
    """Wraps an encoder's PyAV codec context: thread CPU seconds spent in its
    ``encode`` (libavcodec, called without the GIL) go to ``spent``."""

    def __init__(self, ctx) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "spent", 0.0)

    def encode(self, frame):
        c0 = time.thread_time()
        try:
            return list(self._ctx.encode(frame))
        finally:
            object.__setattr__(self, "spent", self.spent + time.thread_time() - c0)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def encode_stream(codec: str, frames: list[np.ndarray], start: threading.Barrier | None = None) -> dict:
    """Encode ``frames`` as one stream, as aiortc's sender does (a key frame first).

    Returns per-frame wall and thread-CPU seconds (lists), the thread CPU seconds
    outside libavcodec (``gil``: aiortc's packetisation and PyAV's wrapping, the part
    that holds the GIL) and payload bytes.
    """
    from av import VideoFrame

    encoder = make_encoder(codec)
    wall, cpu, gil, sizes = [], [], [], []
    if start is not None:
        start.wait()
    for s, planes in enumerate(frames):
        frame = VideoFrame.from_ndarray(planes, format="yuv420p")  # the track does this in recv()
        frame.pts = video_pts(s)
        frame.time_base = VIDEO_TIME_BASE
        if encoder.codec is not None and not isinstance(encoder.codec, _TimedCodec):
            encoder.codec = _TimedCodec(encoder.codec)  # opened by the first frame
        in_codec = encoder.codec.spent if isinstance(encoder.codec, _TimedCodec) else 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        payloads, _ = encoder.encode(frame, s == 0)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        gil.append(cpu[-1] - (encoder.codec.spent - in_codec if isinstance(encoder.codec, _TimedCodec) else 0.0))
        sizes.append(sum(len(p) for p in payloads))
    return {"wall": wall, "cpu": cpu, "gil": gil, "bytes": sizes, "bitrate": encoder.target_bitrate}


def _ms(values: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values)
    return {"mean": round(statistics.fmean(ms), 2), "p95": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def summarise(runs: list[dict], wall_s: float, process_cpu_s: float) -> dict:
    """Per-frame figures over all streams (first frame of each apart), and throughput."""
    steady_wall = [v for r in runs for v in r["wall"][1:]]
    steady_cpu = [v for r in runs for v in r["cpu"][1:]]
    steady_gil = [v for r in runs for v in r["gil"][1:]]
    frames = sum(len(r["wall"]) for r in runs)
    seconds = len(runs[0]["wall"]) / VIDEO_FPS
    return {
        "streams": len(runs),
        "target_bitrate_bps": runs[0]["bitrate"],
        "first_frame_ms": round(max(r["wall"][0] for r in runs) * 1000, 1),
        "encode_ms": _ms(steady_wall),
        "thread_cpu_ms": _ms(steady_cpu),
        "gil_held_cpu_ms": _ms(steady_gil),
        "process_cpu_ms_per_frame": round(process_cpu_s * 1000 / frames, 2),
        "bytes_per_s_per_stream": round(statistics.fmean(sum(r["bytes"]) for r in runs) / seconds),
        "wall_s": round(wall_s, 2),
        "cores_used": round(process_cpu_s / wall_s, 2),
        "streams_at_25fps": round(frames / wall_s / VIDEO_FPS, 2),
        # ceilings from the CPU figures alone (no load): per core, and per GIL (a
        # process's encoders can only hold the GIL one at a time)
        "streams_per_core": round(1000 * frames / (process_cpu_s * 1000) / VIDEO_FPS, 1),
        "streams_per_gil": round(1000 / (statistics.fmean(steady_gil) * 1000) / VIDEO_FPS, 1),
    }


def run(codec: str, frames: list[np.ndarray], streams: int) -> dict:
    """Encode ``streams`` copies of ``frames`` at once, one thread each; summarise."""
    barrier = threading.Barrier(streams + 1)
    results: list[dict | None] = [None] * streams

    def work(i: int) -> None:
        results[i] = encode_stream(codec, frames, barrier)

    threads = [threading.Thread(target=work, args=(i,), name=f"{codec}-{i}") for i in range(streams)]
    for t in threads:
        t.start()
    c0 = time.process_time()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return summarise([r for r in results if r is not None], wall, cpu)


def run_on_one_core(codec: str, frames: list[np.ndarray], streams: int) -> dict | None:
    """``run`` with this thread, and so the encoder threads it starts, on one CPU;
    None where affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        return run(codec, frames, streams)
    finally:
        os.sched_setaffinity(0, cpus)


def uptime() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=250, help="frames per stream (250 = 10 s at 25 fps)")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams in the concurrent run (0: skip it)")
    p.add_argument("--codecs", default="vp8,h264")
    p.add_argument("--speech", type=Path, help="speech driving the mouth (default: bench.common.load_speech)")
    p.add_argument("--avatars_dir", type=Path, default=ROOT / "data" / "avatars")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.frames < 2:
        p.error("--frames must be >= 2")
    load_before = uptime()
    frames, info = avatar_frames(args.frames, args.avatars_dir, args.speech)
    import aiortc
    import av

    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "aiortc": aiortc.__version__,
                    "av": av.__version__, "load_before": load_before},
        "video": info,
        "codecs": {},
    }
    for codec in args.codecs.split(","):
        entry = {"single": run(codec, frames, 1)}
        if args.streams > 0:
            entry["concurrent"] = run(codec, frames, args.streams)
            one = run_on_one_core(codec, frames, args.streams)
            if one is not None:
                entry["concurrent_one_core"] = one
                entry["scaling"] = round(entry["concurrent"]["streams_at_25fps"] / one["streams_at_25fps"], 2)
        result["codecs"][codec] = entry
    single = {c: e["single"]["process_cpu_ms_per_frame"] for c, e in result["codecs"].items()}
    result["cheaper"] = min(single, key=single.get)
    result["machine"]["load_after"] = uptime()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
