"""Drift of streaming MuseTalk audio features from the 30 s reference, on real speech.

For each clip (``../shared/media/yongen.wav``, ``sun.wav``) and MuseTalk version the
reference windows come from ``reference_features`` (every 30 s segment padded to
30 s) and the streaming windows from ``StreamingFeatureExtractor``, fed the way
``museasr.MuseASR`` feeds it: the utterance with the ASR's zero lookbehind in front
and zero padding behind, ``--batch`` consecutive frames per call, one
``StreamState`` per clip. Per video frame: relative L2 error
``|stream - ref| / |ref|`` of the (50, d) window and cosine similarity; statistics
over the *interior* frames (whose reference window lies inside the clip: every
frame but the last ~3, whose reference uses clamp/zero windows the stream cannot
know in advance; those are reported apart as ``last_frames_rel_err``); the error
per 20 ms step of the window (``edge_excess``: how much worse its first/last step
is than its median step). Also wall time per call on this machine and the
encoder's multiply-accumulates per call.

Yardsticks printed with the results: how much a reference window changes from one
video frame to the next (the signal the UNet follows), and how much the reference
itself changes when the same audio is cut into a shorter utterance.

Encoder: ``--models_dir models`` loads the real Whisper-tiny encoder through the
server's loader (``whisper/tiny.pt`` or a transformers ``whisper-tiny`` folder, as
MuseTalk's own download script fetches); without it a Whisper-tiny-sized encoder
with random weights (seed 0): that measures the architecture's context sensitivity
only. Random attention is nearly uniform over all 1500 positions, far more global
than trained heads, so re-run with the real weights before trusting the numbers.

Usage::

    .venv/bin/python bench/musetalk_feature_drift.py [--models_dir models] [--out drift.json]

Prints one JSON object (also written to ``--out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from whisper.model import AudioEncoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audio import decode_audio  # noqa: E402
from baseasr import FEATURE_BATCH  # noqa: E402
from clock import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from musetalk.audio_features import (  # noqa: E402
    DEFAULT_SILENCE_TOKENS,
    FEATURE_SAMPLES,
    SEGMENT_FEATURES,
    WINDOW_FEATURES,
    StreamingFeatureExtractor,
    StreamState,
    frame_windows,
    reference_features,
)

MEDIA = ROOT.parent / "shared" / "media"
# Whisper-tiny's encoder (openai-whisper model card / tiny.pt dims).
TINY = dict(n_mels=80, n_ctx=1500, n_state=384, n_head=6, n_layer=4)
# Recommendation threshold on the p95 relative error of interior frames: 5 % (cosine
# similarity stays above ~0.998), or, if larger, the reference's own variability: the
# p95 change of its windows when the first PREFIX_CUTS_S seconds of a clip are taken as
# their own utterance. MuseTalk is used on utterances of every length, so a change of
# that size is one the model already meets, and it comes from what a stream cannot
# have either (the audio after a cut / after its lookahead).
THRESHOLD = 0.05
PREFIX_CUTS_S = (1.0, 2.0, 4.0)
# Context is enough when the error of the window's first and last 20 ms (next to the
# span's edges: STFT reflect padding, convolution zero padding, attention cut off) is
# within 5 % of the median error of its 10 time steps.
EDGE_EXCESS = 0.05
RECOMMENDED_KEYS = (
    "left_ms",
    "right_ms",
    "silence_tokens",
    "lookahead_after_frame_end_ms",
    "all",
    "edge_excess",
    "ms_per_call_p50",
    "ms_per_call_min",
    "gmacs_per_call",
)


def load_encoder(models_dir: Path | None) -> tuple[AudioEncoder, str]:
    """The encoder to measure, and a description of its weights.

    Raises:
        musetalk.models.MissingWeightsError: ``models_dir`` lacks a file of the
            released layout or holds a malformed one.
    """
    if models_dir is None:
        torch.manual_seed(0)
        enc = AudioEncoder(**TINY)
        return enc.eval(), "random (torch.manual_seed(0)): measures the architecture's context sensitivity only"
    from musetalk.models import find_weights, load_whisper_encoder

    paths = find_weights(models_dir)
    return load_whisper_encoder(paths), f"released Whisper-tiny {paths.whisper}"


def encoder_gmacs(enc: AudioEncoder, tokens: int, silence: int = 0) -> float:
    """Multiply-accumulates (1e9) of one encoder pass: ``tokens`` span frames plus
    ``silence`` compressed silence tokens (convolutions run on the span only)."""
    d, n_mels = enc.conv1.out_channels, enc.conv1.in_channels
    conv = 2 * tokens * 3 * n_mels * d + tokens * 3 * d * d
    n = tokens + silence
    per_block = n * 12 * d * d + 2 * n * n * d  # q, k, v, out + 4x MLP; scores + weighted sum
    return (conv + len(enc.blocks) * per_block) / 1e9


def rel_errors(stream: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame relative L2 error and cosine similarity of (F, 50, d) windows."""
    s, r = stream.reshape(len(stream), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    ns, nr = np.linalg.norm(s, axis=1), np.linalg.norm(r, axis=1)
    err = np.linalg.norm(s - r, axis=1) / np.maximum(nr, 1e-12)
    cos = (s * r).sum(1) / np.maximum(ns * nr, 1e-12)
    return err, cos


def summary(err: np.ndarray, cos: np.ndarray) -> dict:
    return {
        "rel_err_mean": round(float(err.mean()), 5),
        "rel_err_p95": round(float(np.percentile(err, 95)), 5),
        "rel_err_max": round(float(err.max()), 5),
        "cos_mean": round(float(cos.mean()), 6),
        "cos_min": round(float(cos.min()), 6),
    }


def stream_windows(ex: StreamingFeatureExtractor, pcm: np.ndarray, batch: int) -> tuple[np.ndarray, list[float]]:
    """All frames' streaming windows, fed as MuseASR feeds them; and seconds per call
    of ``batch`` frames (the clip's shorter last call left out)."""
    n_frames = -(-pcm.size // FRAME_SAMPLES)
    padded = np.pad(pcm, (ex.lookbehind_samples, n_frames * FRAME_SAMPLES - pcm.size + ex.lookahead_samples))
    state, out, times = StreamState(), [], []
    for f0 in range(0, n_frames, batch):
        n = min(batch, n_frames - f0)
        span = padded[f0 * FRAME_SAMPLES : f0 * FRAME_SAMPLES + ex.span_samples(n)]
        t = time.perf_counter()
        out.append(ex.windows(span, n, f0, state))
        if n == batch:
            times.append(time.perf_counter() - t)
    return np.concatenate(out), times


def sq_by_window_step(windows: np.ndarray) -> np.ndarray:
    """Sum of squares of (F, 50, d) windows per 20 ms time step of the window: (10,)."""
    return (windows.reshape(len(windows), WINDOW_FEATURES, -1).astype(np.float64) ** 2).sum((0, 2))


def interior(n_features: int, n_frames: int) -> np.ndarray:
    """Frames whose reference window 2f-4 .. 2f+5 ends inside the clip."""
    return 2 * np.arange(n_frames) + 5 < n_features


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models_dir", type=Path,
                    help="released weights folder: its whisper/ encoder (default: random weights, seed 0)")
    ap.add_argument("--clips", default="yongen.wav,sun.wav", help="files in ../shared/media")
    ap.add_argument("--left", default="0,80,160,320,640,1000", help="left context values (ms)")
    ap.add_argument("--right", default="0,40,80,160,320", help="right context values (ms)")
    ap.add_argument("--silence_tokens", default="0,32,64,128,256,1500", help="values swept at the recommended context")
    ap.add_argument("--batch", type=int, default=FEATURE_BATCH, help="frames per call (BaseASR's feature batch)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    enc, weights = load_encoder(args.models_dir)
    clips = {}
    for name in args.clips.split(","):
        clips[name] = decode_audio((MEDIA / name).read_bytes(), max_seconds=600)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Reference windows and yardsticks.
    refs: dict[tuple[str, str], np.ndarray] = {}
    masks: dict[tuple[str, str], np.ndarray] = {}
    ref_times, yard = [], {}
    for version in ("v15", "v1"):
        for name, pcm in clips.items():
            t = time.perf_counter()
            feats = reference_features(enc, pcm, version)
            ref_times.append((time.perf_counter() - t) / math.ceil(pcm.size / (SEGMENT_FEATURES * FEATURE_SAMPLES)))
            n_frames = -(-pcm.size // FRAME_SAMPLES)
            refs[version, name] = frame_windows(feats, np.arange(n_frames), version)
            masks[version, name] = interior(len(feats), n_frames)
    for name, pcm in clips.items():
        w, m = refs["v15", name], masks["v15", name]
        flat = w.reshape(len(w), -1)
        step = np.linalg.norm(flat[1:] - flat[:-1], axis=1) / np.linalg.norm(flat[1:], axis=1)
        yard[name] = {"ref_frame_to_frame_rel_change_median": round(float(np.median(step[m[1:]])), 4)}
        for cut_s in PREFIX_CUTS_S:
            cut = pcm[: int(cut_s * SAMPLE_RATE)]
            pre = reference_features(enc, cut, "v15")
            n_pre = -(-cut.size // FRAME_SAMPLES)
            keep = interior(len(pre), n_pre)
            err, _ = rel_errors(frame_windows(pre, np.arange(n_pre), "v15")[keep], w[:n_pre][keep])
            yard[name][f"ref_first_{cut_s:g}s_as_own_utterance_rel_err_p95"] = round(float(np.percentile(err, 95)), 5)
    self_variability = max(v for y in yard.values() for k, v in y.items() if k.endswith("own_utterance_rel_err_p95"))
    threshold = max(THRESHOLD, self_variability)
    log(f"yardsticks: {json.dumps(yard)}")

    def measure(version: str, left: int, right: int, silence: int) -> dict:
        ex = StreamingFeatureExtractor(enc, version, left, right, silence_tokens=silence)
        per_clip, errs, coss, times = {}, [], [], []
        for name, pcm in clips.items():
            ref, m = refs[version, name], masks[version, name]
            win, t = stream_windows(ex, pcm, args.batch)
            err, cos = rel_errors(win, ref)
            step_err = np.sqrt(sq_by_window_step((win - ref)[m]) / sq_by_window_step(ref[m]))
            per_clip[name] = summary(err[m], cos[m]) | {
                "rel_err_by_window_step": [round(float(e), 5) for e in step_err],
                "edge_excess": round(float(max(step_err[0], step_err[-1]) / np.median(step_err) - 1), 4),
                "last_frames_rel_err": [round(float(e), 3) for e in err[~m]],
            }
            errs.append(err[m])
            coss.append(cos[m])
            times += t
        span_frames = ex.span_samples(args.batch) // FEATURE_SAMPLES
        row = {
            "version": version,
            "left_ms": left,
            "right_ms": right,
            "silence_tokens": silence,
            "lookahead_after_frame_end_ms": ex.lookahead_samples * 1000 // SAMPLE_RATE,
            "all": summary(np.concatenate(errs), np.concatenate(coss)),
            "edge_excess": max(c["edge_excess"] for c in per_clip.values()),
            "per_clip": per_clip,
            "ms_per_call_p50": round(1000 * float(np.median(times)), 2),
            "ms_per_call_min": round(1000 * float(np.min(times)), 2),
            "gmacs_per_call": round(encoder_gmacs(enc, span_frames, min(silence, SEGMENT_FEATURES - span_frames)), 3),
        }
        a = row["all"]
        log(
            f"{version} L={left:4d} R={right:3d} M={silence:4d}  "
            f"err mean {a['rel_err_mean']:.4f} p95 {a['rel_err_p95']:.4f} "
            f"max {a['rel_err_max']:.4f} cos min {a['cos_min']:.4f} edge {row['edge_excess']:+.3f}  "
            f"{row['ms_per_call_p50']:.1f} ms/call (min {row['ms_per_call_min']:.1f})  {row['gmacs_per_call']} GMAC"
        )
        return row

    lefts = [int(v) for v in args.left.split(",")]
    rights = [int(v) for v in args.right.split(",")]
    grid = [measure("v15", left, right, DEFAULT_SILENCE_TOKENS) for right in rights for left in lefts]
    # Recommendation: the least lookahead (it is latency), then the least left context
    # (it is compute), whose p95 error is under the threshold and whose window edges are
    # as accurate as its middle (more context on either side would not help).
    passing = [r for r in grid if r["all"]["rel_err_p95"] < threshold and r["edge_excess"] < EDGE_EXCESS]
    best = min(passing, key=lambda r: (r["right_ms"], r["left_ms"])) if passing else None
    at = best or min(grid, key=lambda r: r["all"]["rel_err_p95"])
    sweep = [measure("v15", at["left_ms"], at["right_ms"], m) for m in (int(v) for v in args.silence_tokens.split(","))]
    v1 = measure("v1", at["left_ms"], at["right_ms"], DEFAULT_SILENCE_TOKENS)
    result = {
        "benchmark": "musetalk_feature_drift",
        "encoder": {"weights": weights, "dims": dict(n_mels=enc.conv1.in_channels, n_state=enc.conv1.out_channels,
                                                     n_layer=len(enc.blocks), n_head=enc.blocks[0].attn.n_head)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "clips": {
            name: {"seconds": round(pcm.size / SAMPLE_RATE, 3), "frames": -(-pcm.size // FRAME_SAMPLES)}
            for name, pcm in clips.items()
        },
        "frames_per_call": args.batch,
        "reference": {
            "ms_per_30s_segment_p50": round(1000 * float(np.median(ref_times)), 1),
            "ms_per_30s_segment_min": round(1000 * float(np.min(ref_times)), 1),
            "gmacs_per_30s_segment": round(encoder_gmacs(enc, SEGMENT_FEATURES), 2),
        },
        "yardsticks": yard,
        "threshold": {
            "rel_err_p95": round(threshold, 5),
            "why": "p95 relative L2 error of interior frames (all clips pooled) under max(5 %, the reference's own "
            "p95 change when a clip's first 1/2/4 s are taken as their own utterance = "
            f"{self_variability:.4f}): MuseTalk meets changes of that size whenever an utterance is cut differently, "
            "and they come from what a stream cannot have either (the audio after its lookahead); compare the "
            "reference's median change from one video frame to the next (yardsticks). And edge_excess (error of "
            "the window's first/last 20 ms over the median of its 10 steps, worst clip) under "
            f"{EDGE_EXCESS}: the context has absorbed the span's edges",
        },
        "grid_v15": grid,
        "silence_tokens_sweep_v15": sweep,
        "v1_at_recommended": v1,
        "recommended": None
        if best is None
        else {k: best[k] for k in RECOMMENDED_KEYS},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    log(f"recommended: {json.dumps(result['recommended'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
