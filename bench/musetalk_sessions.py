"""MuseTalk sessions per GPU: how many concurrent speaking sessions the model side holds.

Runs N real session workers (``basereal.BaseReal``: ASR thread with streaming
Whisper features, inference thread on progressive batches, compositing thread
with paste-back and I420 conversion) sharing one ``MuseTalkEngine`` (continuous
batching across sessions), and plays each session's ``PlayoutBuffer`` out on a
25 fps clock the way the WebRTC tracks do, without the network and the video
encoder. Every session speaks the same clip over and over (starts staggered over
one second), so all N sessions need 25 fps of generated faces at once.

Counted per session count N, over ``--seconds`` of playout:

- ``underrun_pct``: idle frames forced into speech because the model side was late
  (``PlayoutBuffer.underruns`` / speech frames played), the figure a viewer sees
  as a frozen mouth; a count holds when it is below 1 %;
- ``first_speech_ms``: audio handed to the session -> the slot its first speech
  frame plays in (p50 / p95 over the utterances);
- ``batch_frames``: mean and max frames per UNet+VAE pass (how much sessions share);
- ``rtf``: speech frames played / (N x slots) while every session was speaking.

What it leaves out: WebRTC encoding (a CPU cost per stream, measured on the
default model by ``bench/latency.py``; the H100 and H200 have no NVENC).

Usage::

    python bench/musetalk_sessions.py --random full --sessions 1,2,4,8,12,16 [--seconds 20]
    python bench/musetalk_sessions.py --models_dir models --sessions 4     # released weights
    python bench/musetalk_sessions.py --random tiny --sessions 1,2 --seconds 4   # CPU smoke run

``--random full|tiny`` writes random weights in the released formats to a temporary
``models/`` folder first and loads them through the same loaders (full: the
released sizes, same FLOPs as the real model). Prints one JSON object (also
written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, load_speech  # noqa: E402
from clock import FRAME_MS, SAMPLE_RATE  # noqa: E402

UNDERRUN_LIMIT_PCT = 1.0


def load_factory(args, workdir: Path):
    """(server options, avatar, per-session model factory, engine) as the server builds them.

    ``--model default`` (the embedded model; engine None) checks the harness itself.
    """
    import avatar as avatar_mod
    from config import parse_args

    avatar = (avatar_mod.ensure_default_avatar(args.avatars_dir) if args.avatar_id is None
              else avatar_mod.load_avatar(args.avatar_id, args.avatars_dir))
    if args.model == "default":
        from visememodel import VisemeWarpModel

        server_args = parse_args(["--latency_mode", args.latency_mode])
        return server_args, avatar, lambda: VisemeWarpModel(
            avatar, lookahead_ms=server_args.r * 20, lookbehind_ms=server_args.l * 20), None
    from musereal import musetalk_model_factory

    models_dir = args.models_dir
    if args.random:
        from musetalk.checkpoints import write_models

        models_dir = workdir / "models"
        t = time.perf_counter()
        write_models(models_dir, version="v15", size=args.random)
        print(f"wrote {args.random} random checkpoints in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    server_args = parse_args(["--model", "musetalk", "--models_dir", str(models_dir),
                              "--latency_mode", args.latency_mode, "--parsing", "landmarks",
                              "--musetalk_compile", args.musetalk_compile])
    factory = musetalk_model_factory(server_args, avatar)
    engine = factory().engine
    return server_args, avatar, factory, engine


class Listener:
    """Plays the sessions out on one 25 fps clock and counts what a viewer would see."""

    def __init__(self, workers) -> None:
        self.workers = workers
        self.speech_frames = [0] * len(workers)
        self.slots = 0
        # per session: when the utterance now waiting for its first frame was sent
        # (set by the talker, cleared here), and the latencies measured so far (ms)
        self.pending: list[float | None] = [None] * len(workers)
        self.first_speech_ms: list[float] = []
        self._stop = threading.Event()
        self.t0 = 0.0

    def run(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        period = FRAME_MS / 1000
        for slot in range(int(seconds / period)):
            # pace the clock: wait for this slot's due time (a timer, not a hand-over)
            self._stop.wait(max(0.0, self.t0 + slot * period - time.monotonic()))
            due = self.t0 + slot * period
            for k, w in enumerate(self.workers):
                if w.playout.unit_for_slot(slot).idle:
                    continue
                self.speech_frames[k] += 1
                sent, self.pending[k] = self.pending[k], None
                if sent is not None:
                    self.first_speech_ms.append((due - sent) * 1000)
            self.slots = slot + 1


def run_sessions(n: int, args, server_args, avatar, factory, engine, speech: np.ndarray) -> dict:
    from basereal import BaseReal
    from config import session_options
    from metrics import Metrics

    metrics = Metrics()
    options = session_options(server_args)
    workers = [BaseReal(f"bench{k:04d}", factory(), avatar, options, metrics.session(f"bench{k:04d}"))
               for k in range(n)]
    for w in workers:
        w.start()
    listener = Listener(workers)
    stop = threading.Event()
    gap_s = args.gap

    def talker(k: int) -> None:
        """Session k speaks the clip again and again, starting k/n s late."""
        if stop.wait(k / max(1, n)):
            return
        while not stop.is_set():
            w = workers[k]
            listener.pending[k] = time.monotonic()
            w.put_audio(speech, block=True)
            # the next utterance starts when this one has played out, plus a pause
            while w.is_speaking() and not stop.is_set():
                stop.wait(0.02)
            stop.wait(gap_s)

    if engine is not None:
        engine.batch_sizes = []
    talkers = [threading.Thread(target=talker, args=(k,), daemon=True) for k in range(n)]
    for t in talkers:
        t.start()
    try:
        listener.run(args.seconds)
    finally:
        stop.set()
        for w in workers:
            w.stop()
    latencies = listener.first_speech_ms
    underruns = sum(w.playout.underruns for w in workers)
    speech_frames = sum(listener.speech_frames)
    batches = (engine.batch_sizes if engine is not None else None) or [0]
    return {
        "sessions": n,
        "seconds": args.seconds,
        "speech_frames": speech_frames,
        "underruns": underruns,
        "underrun_pct": round(100 * underruns / max(1, speech_frames + underruns), 2),
        "utterances": len(latencies),
        "first_speech_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p95": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        },
        "batch_frames": {"mean": round(float(np.mean(batches)), 1), "max": int(max(batches)),
                         "passes": len(batches) if batches != [0] else 0},
        "speech_share": round(speech_frames / max(1, n * listener.slots), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("musetalk", "default"), default="musetalk",
                    help="default: the embedded model, to check the harness")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--models_dir", type=Path, help="released weights (models/ layout)")
    src.add_argument("--random", choices=("tiny", "full"), help="random weights in the released formats")
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=20.0, help="playout time per session count")
    ap.add_argument("--gap", type=float, default=0.5, help="pause between utterances (s)")
    ap.add_argument("--speech", type=Path, help=".npy (float32 16 kHz) or audio file (default: ../shared sun.wav, else espeak)")
    ap.add_argument("--speech_seconds", type=float, default=8.0, help="utterance length cut from the clip")
    ap.add_argument("--latency_mode", default="low")
    ap.add_argument("--musetalk_compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                    help="as the server's option: torch.compile the engine (per batch-size bucket)")
    ap.add_argument("--avatar_id", help="prepared avatar (default: the built-in one)")
    ap.add_argument("--avatars_dir", type=Path, default=ROOT / "data" / "avatars")
    ap.add_argument("--stop_after_fail", action=argparse.BooleanOptionalAction, default=True,
                    help="stop at the first count with >= 1 %% underruns")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.model == "musetalk" and not (args.models_dir or args.random):
        ap.error("--model musetalk needs --models_dir or --random")

    import torch

    speech = load_speech(args.speech)[: int(args.speech_seconds * SAMPLE_RATE)]
    with tempfile.TemporaryDirectory() as tmp:
        server_args, avatar, factory, engine = load_factory(args, Path(tmp))
        rows = []
        for n in (int(x) for x in args.sessions.split(",")):
            row = run_sessions(n, args, server_args, avatar, factory, engine, speech)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            if args.stop_after_fail and row["underrun_pct"] >= UNDERRUN_LIMIT_PCT:
                break
    holding = [r["sessions"] for r in rows if r["underrun_pct"] < UNDERRUN_LIMIT_PCT]
    cuda = engine is not None and engine.device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "model": args.model,
        "dtype": str(engine.dtype).removeprefix("torch.") if engine is not None else None,
        "torch": torch.__version__,
        "weights": None if engine is None else args.random and f"random {args.random}" or str(args.models_dir),
        "latency_mode": args.latency_mode,
        "batch_size": server_args.batch_size,
        "compile": None if engine is None else engine.compile_mode,
        "rows": rows,
        "sessions_holding": max(holding) if holding else 0,
        "criterion": f"underrun_pct < {UNDERRUN_LIMIT_PCT}",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
