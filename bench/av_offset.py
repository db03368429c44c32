"""A/V offset of the embedded default model across voices (issue #7).

Builds a set of speech clips from sources the model was not tuned on (piper's joe
voice at three speaking rates, espeak-ng male and female voices at several rates)
plus the repository's demo media (``../shared/media/yongen.wav`` and ``sun.wav``,
when present), and measures per clip the offset between mouth motion and the
audio envelope (positive = mouth after the sound), two ways:

- ``offline``: the clip goes through the session's own code path without the
  network: ``baseasr.BaseASR`` (20 ms chunks, VAD tags, context windows) ->
  ``VisemeWarpModel.infer`` with the inference thread's reset rule -> the
  avatar's composite, one frame per 40 ms slot, audio chunks on the same slot
  grid. The frames and audio are packed into a ``client.Received`` and measured
  with ``client.av_offset``, exactly as at a client. Fast (~1 s per clip).
- ``client``: the clip is pushed to a real server (``app.py`` in a subprocess,
  ``client.ServerProcess``) through ``/humanaudio`` and received by an aiortc
  client (``client.AvatarClient``); ``client.av_offset`` on what arrived.

Usage::

    .venv/bin/python bench/av_offset.py [--mode offline,client] [--clips NAME,...] [--variants] [--out FILE]

Prints one JSON object (also written to ``--out``): one row per clip and mode with
voice, engine, rate, duration_s, offset_ms and r (the peak correlation), plus
held_offset_ms: the same correlation with each frame held on screen for its 40 ms
(``held_offset``) instead of sampled at its pts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MEDIA, emit  # noqa: E402
from clock import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402

TARGET_MS = 20.0  # |offset| target per clip (issue #7)
LEAD_FRAMES = 12  # idle slots (480 ms) before the utterance in the offline timeline
TAIL_FRAMES = 12  # idle slots after it

# Public-domain reading passages (phonetically balanced texts used in speech research).
RAINBOW = ("When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow. "
           "The rainbow is a division of white light into many beautiful colors. These take the shape "
           "of a long round arch, with its path high above, and its two ends apparently beyond the horizon. "
           "There is, according to legend, a boiling pot of gold at one end.")
NORTH_WIND = ("The North Wind and the Sun were disputing which was the stronger, when a traveler came along "
              "wrapped in a warm cloak. They agreed that the one who first succeeded in making the traveler "
              "take his cloak off should be considered stronger than the other.")
GRANDFATHER = ("You wish to know all about my grandfather. Well, he is nearly ninety-three years old. "
               "He dresses himself in an ancient black frock coat, usually minus several buttons; "
               "yet he still thinks as swiftly as ever.")
PLEASE_CALL = ("Please call Stella. Ask her to bring these things with her from the store: six spoons of "
               "fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.")


@dataclass(frozen=True)
class ClipSpec:
    """One benchmark clip.

    name: short id. engine: "file", "piper" or "espeak". voice: file name, piper
    voice or espeak voice (with variant). rate: piper length_scale (> 1 slower) or
    espeak words per minute; None for a recording. text: what the TTS reads.
    tuning: the model's timing was calibrated on this clip (the others are held out).
    """

    name: str
    engine: str
    voice: str
    rate: float | None
    text: str = ""
    note: str = ""
    tuning: bool = False


CLIPS: tuple[ClipSpec, ...] = (
    ClipSpec("yongen", "file", "yongen.wav", None, note="demo recording (8 s)", tuning=True),
    ClipSpec("sun", "file", "sun.wav", None, note="demo recording (22.5 s)", tuning=True),
    ClipSpec("piper_joe", "piper", "en_US-joe-medium", 1.0, RAINBOW, "male US, neural TTS", tuning=True),
    ClipSpec("piper_joe_fast", "piper", "en_US-joe-medium", 0.7, NORTH_WIND, "male US, neural TTS, fast"),
    ClipSpec("piper_joe_slow", "piper", "en_US-joe-medium", 1.4, GRANDFATHER, "male US, neural TTS, slow"),
    ClipSpec("espeak_m", "espeak", "en-us", 175, RAINBOW, "male US, formant TTS", tuning=True),
    ClipSpec("espeak_f3", "espeak", "en-us+f3", 175, NORTH_WIND, "female variant, formant TTS"),
    ClipSpec("espeak_f2_fast", "espeak", "en-us+f2", 260, PLEASE_CALL, "female variant, fast"),
    ClipSpec("espeak_m_slow", "espeak", "en", 120, GRANDFATHER, "male British, slow"),
    ClipSpec("espeak_f4_slow", "espeak", "en-us+f4", 130, RAINBOW, "female variant, slow"),
)


def synthesize(spec: ClipSpec) -> np.ndarray | None:
    """float32 16 kHz mono speech of ``spec`` (sentence by sentence, as the server's
    TTS thread produces it, joined); None when its source is unavailable."""
    if spec.engine == "file":
        path = MEDIA / spec.voice
        if not path.exists():
            return None
        from audio import decode_audio

        return decode_audio(path.read_bytes(), max_seconds=600)
    from tts import EspeakTTS, PiperTTS, split_sentences

    if spec.engine == "piper":
        try:
            engine = PiperTTS(length_scale=spec.rate)
        except (ImportError, FileNotFoundError):
            return None
    else:
        engine = EspeakTTS(spec.voice, int(spec.rate or 175))
    parts = [engine.synthesize(s) for s in split_sentences(spec.text)]
    return np.concatenate([p for p in parts if p.size]).astype(np.float32)


def variants(pcm: np.ndarray) -> dict[str, np.ndarray]:
    """Recording conditions applied to a clip (robustness rows, ``--variants``):
    20 dB quieter, 6 dB louder (clipped), a -45 dBFS brown-ish noise floor, a 0.5 s
    RT60 synthetic reverb (level kept), and a 300-3400 Hz telephone band."""
    from scipy.signal import butter, lfilter

    rng = np.random.default_rng(0)
    noise = lfilter([1.0], [1.0, -0.95], rng.standard_normal(len(pcm)))
    noise *= 10 ** (-45 / 20) / np.sqrt(np.mean(noise**2))
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / 0.5)
    rir[0] = 8.0
    wet = np.convolve(pcm, rir)[: len(pcm)]
    wet *= np.sqrt(np.mean(pcm**2) / np.mean(wet**2))
    b, a = butter(4, [300 / 8000, 3400 / 8000], "band")
    out = {"quiet_-20dB": pcm * 0.1, "loud_+6dB": np.clip(pcm * 2.0, -1.0, 1.0), "noise_-45dBFS": pcm + noise,
           "reverb_0.5s": wet, "phone_band": lfilter(b, a, pcm)}
    return {k: v.astype(np.float32) for k, v in out.items()}


# -- offline: the session's code path without the network --------------------------
def session_units(model, pcm: np.ndarray) -> list:
    """The ``baseasr.AudioUnit`` stream a session's ASR thread makes of ``pcm`` pushed
    as one utterance (``/humanaudio``): one unit per 40 ms frame, features computed
    by ``model.features`` for speech frames. Runs the real ``BaseASR`` thread."""
    from baseasr import AudioInbox, AudioSegment, BaseASR, StageQueue

    out: StageQueue = StageQueue(maxsize=1 << 20)
    inbox = AudioInbox(max_seconds=len(pcm) / SAMPLE_RATE + 1)
    stop = threading.Event()
    asr = BaseASR(model.features, model.lookbehind_chunks, model.lookahead_chunks, out, inbox,
                  epoch=lambda: 0, loop_hint=lambda: 0, stop_event=stop)
    asr.start()
    inbox.put(AudioSegment(pcm=np.asarray(pcm, np.float32), epoch=0, end_of_utterance=True))
    units = []
    try:
        while not units or not units[-1].final:
            unit = out.get(timeout=30.0)
            if unit is None:
                raise RuntimeError("the ASR thread produced no final frame")
            units.append(unit)
    finally:
        stop.set()
        inbox.close()
        asr.join()
    return units


def offline_received(pcm: np.ndarray, avatar, model_factory: Callable[[], object]):
    """What a client would receive for ``pcm`` pushed as one utterance, without the
    network: ``(client.Received, mouth box)``. LEAD_FRAMES idle slots before and
    TAIL_FRAMES after; video frame s at media time s x 40 ms with audio chunks 2s,
    2s+1 (the session clock's pairing). model_factory: a fresh per-session model.
    The inference thread's rule applies: speech frames go through ``model.infer``
    in order, a silent frame after speech resets the model."""
    import cv2

    from client import VIDEO_SCALE, Received, mouth_box

    model = model_factory()
    units = session_units(model, pcm)
    idle_bgr = avatar.frame(0)
    rec = Received(audio_rate=SAMPLE_RATE, first_frame_bgr=idle_bgr.copy())

    def add(frame_bgr: np.ndarray, audio: np.ndarray) -> None:
        s = len(rec.video)
        gray = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
        rec.video.append(cv2.resize(gray, None, fx=VIDEO_SCALE, fy=VIDEO_SCALE, interpolation=cv2.INTER_AREA))
        rec.video_t.append(s * FRAME_MS / 1000.0)
        rec.audio.append(np.asarray(audio, np.float32))
        rec.audio_t.append(s * FRAME_MS / 1000.0)

    silence = np.zeros(FRAME_SAMPLES, np.float32)
    for _ in range(LEAD_FRAMES):
        add(idle_bgr, silence)
    silent = True
    for u in units:
        patch = None
        if not u.speech:
            if not silent:
                model.reset()
                silent = True
        else:
            silent = False
            patch = model.infer(u.features[None], [u.loop_index])[0]
        add(avatar.composite(u.loop_index, patch), u.pcm)
    for _ in range(TAIL_FRAMES):
        add(idle_bgr, silence)
    return rec, mouth_box(idle_bgr)


def held_offset(rec, box: tuple[int, int, int, int], max_lag: float = 0.2, step: float = 0.005,
                t_range: tuple[float, float] | None = None, reference: np.ndarray | None = None) -> float:
    """``client.av_offset`` (s, positive = mouth after the sound) with each video frame
    held on screen until the next (as a display shows it): ~20 ms more than sampled."""
    from client import av_offset

    return av_offset(rec, box, max_lag, step, t_range, reference, held=True)[0]


def offline_offset(pcm: np.ndarray, avatar, model_factory: Callable[[], object],
                   step: float = 0.005) -> tuple[float, float]:
    """(offset in s, peak correlation) of ``pcm`` through the session path offline,
    measured by ``client.av_offset`` on a ``step`` (s) lag grid (positive = mouth
    after the sound)."""
    from client import av_offset

    rec, box = offline_received(pcm, avatar, model_factory)
    return av_offset(rec, box, step=step)


def default_model_factory(avatar, lookahead_ms: int = 20, lookbehind_ms: int = 40, **kwargs) -> Callable[[], object]:
    """A factory of ``VisemeWarpModel`` sessions as the server makes them for the
    ``low`` preset (l=2, r=1: lookbehind 40 ms, lookahead 20 ms)."""
    from visememodel import VisemeWarpModel

    return lambda: VisemeWarpModel(avatar, lookahead_ms=lookahead_ms, lookbehind_ms=lookbehind_ms, **kwargs)


# -- at a real aiortc client ------------------------------------------------------------
def _wav(pcm: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV")
    return buf.getvalue()


def audio_path_delay(rec, t_start: float, pcm: np.ndarray) -> float:
    """Delay (s, in [0, 40 ms)) of the received audio behind the slot grid: where
    ``pcm`` (16 kHz) lies in the audio received after media time ``t_start``, found by
    cross-correlation, modulo one 40 ms slot (an utterance starts on a slot
    boundary, so a lossless path reads 0; Opus adds its encoder lookahead)."""
    from scipy.signal import correlate, resample_poly

    at = np.asarray(rec.audio_t)
    i0 = int(np.searchsorted(at, t_start))
    if i0 >= len(rec.audio):
        return float("nan")
    got = np.concatenate(rec.audio[i0:])
    ref = resample_poly(pcm, rec.audio_rate // 1000, SAMPLE_RATE // 1000)
    c = correlate(got, ref, mode="valid", method="fft")
    start = at[i0] + int(np.argmax(c)) / rec.audio_rate
    return float(start % (FRAME_MS / 1000.0))


async def client_offsets(url: str, clips: list[tuple[ClipSpec, np.ndarray]],
                         step: float = 0.005) -> list[tuple[float, float, float, float]]:
    """(offset in s, peak correlation, audio path delay in s, ``held_offset`` in s) per clip, pushed one
    after the other through ``/humanaudio`` to one session and measured on what an
    aiortc client received (``client.av_offset`` on a ``step`` (s) lag grid over each
    clip's own media-time range; ``audio_path_delay``)."""
    from client import AvatarClient, av_offset, mouth_box

    out = []
    async with AvatarClient(url) as c:
        await asyncio.wait_for(c.first_video.wait(), 20)
        await asyncio.sleep(1.5)  # the encoder's quality settles during the first second
        box = mouth_box(c.received.first_frame_bgr)
        for _spec, pcm in clips:
            rec = c.received
            t_start = rec.video_t[-1]
            ref = rec.video[-1]
            r = await c.push_audio(_wav(pcm))
            if r.get("code") != 0:
                raise RuntimeError(f"/humanaudio refused the clip: {r}")
            deadline = time.monotonic() + len(pcm) / SAMPLE_RATE + 20
            while not await c.is_speaking() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while await c.is_speaking() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.8)  # the tail of the last frames
            lag, r = av_offset(rec, box, step=step, t_range=(t_start, rec.video_t[-1]), reference=ref)
            held = held_offset(rec, box, step=step, t_range=(t_start, rec.video_t[-1]), reference=ref)
            out.append((lag, r, audio_path_delay(rec, t_start, pcm), held))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="offline,client", help="offline, client or both")
    ap.add_argument("--clips", help="comma-separated clip names (default: all available): "
                    + ",".join(c.name for c in CLIPS))
    ap.add_argument("--latency_mode", default="low")
    ap.add_argument("--step_ms", type=float, default=1.0, help="lag grid of client.av_offset (ms; it defaults to 5)")
    ap.add_argument("--variants", action="store_true",
                    help="offline only: also each clip quieter, louder, noisy, reverberant, telephone-band")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    modes = set(args.mode.split(","))
    wanted = set(args.clips.split(",")) if args.clips else None
    specs = [c for c in CLIPS if wanted is None or c.name in wanted]
    clips = []
    for spec in specs:
        pcm = synthesize(spec)
        if pcm is not None:
            clips.append((spec, pcm))
    from config import LATENCY_PRESETS

    preset = LATENCY_PRESETS[args.latency_mode]
    rows: list[dict] = []

    def row(spec: ClipSpec, pcm: np.ndarray, mode: str, lag: float, r: float) -> dict:
        return {"clip": spec.name, "mode": mode, "engine": spec.engine, "voice": spec.voice, "rate": spec.rate,
                "duration_s": round(len(pcm) / SAMPLE_RATE, 2), "offset_ms": round(lag * 1000, 1),
                "r": round(r, 3), "ok": abs(lag * 1000) <= TARGET_MS, "set": "tuning" if spec.tuning else "held out",
                "note": spec.note}

    with tempfile.TemporaryDirectory() as tmp:
        if "offline" in modes:
            from avatar import ensure_default_avatar
            from client import av_offset

            avatar = ensure_default_avatar(Path(tmp) / "avatars")
            factory = default_model_factory(avatar, preset["r"] * 20, preset["l"] * 20)
            for spec, pcm in clips:
                conditions = {"": pcm} | (variants(pcm) if args.variants else {})
                for cond, x in conditions.items():
                    rec, box = offline_received(x, avatar, factory)
                    lag, r = av_offset(rec, box, step=args.step_ms / 1000)
                    held = held_offset(rec, box, step=args.step_ms / 1000)
                    rows.append(row(spec, x, "offline", lag, r) | {"held_offset_ms": round(held * 1000, 1)}
                                | ({"condition": cond} if cond else {}))
                    print(f"offline {spec.name:16s} {cond:14s} {lag * 1000:+6.1f} ms r={r:.3f} held {held * 1000:+.1f} ms",
                          file=sys.stderr)
        if "client" in modes:
            from client import ServerProcess

            srv = ServerProcess(Path(tmp), "--model", "default", "--latency_mode", args.latency_mode,
                                "--log_level", "WARNING", "--max_session", "2")
            try:
                results = asyncio.run(client_offsets(srv.url, clips, step=args.step_ms / 1000))
            finally:
                srv.stop()
            for (spec, pcm), (lag, r, delay, held) in zip(clips, results):
                rows.append(row(spec, pcm, "client", lag, r) | {"audio_path_delay_ms": round(delay * 1000, 1),
                                                                "held_offset_ms": round(held * 1000, 1)})
                print(f"client  {spec.name:16s} {lag * 1000:+6.1f} ms r={r:.3f} audio path {delay * 1000:.1f} ms "
                      f"held {held * 1000:+.1f} ms", file=sys.stderr)
    emit({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "latency_mode": args.latency_mode,
        "lookahead_ms": preset["r"] * 20, "lookbehind_ms": preset["l"] * 20,
        "target_abs_offset_ms": TARGET_MS,
        "lag_step_ms": args.step_ms,
        "rows": rows,
    }, args.out)


if __name__ == "__main__":
    main()
