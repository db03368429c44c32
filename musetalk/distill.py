"""Distil MuseTalk into a smaller UNet and a tiny VAE decoder: ``python -m musetalk.distill``.

One command, from the released weights and a folder of talking-head videos::

    python -m musetalk.distill --videos clips/ --models_dir models --out student/ --steps 20000
    python app.py --model musetalk --musetalk_unet student/unet --musetalk_vae student/vae

1. **Data** (``<out>/data``, resumable): every video under ``--videos`` goes through
   the server's own MuseTalk preparation: ``avatar.prepare_avatar`` (frames, dlib
   landmarks), ``musetalk.prepare.prepare_musetalk`` (MuseTalk face boxes, masked
   and reference SD-VAE latents) and ``musetalk.audio_features``'
   :class:`StreamingFeatureExtractor` (the windows the server computes live) on the
   clip's audio track, or on a sidecar audio file with the same stem (``clip.wav``);
   each frame gets the window of its own time on the audio track, by the decoded
   frames' timestamps (streams that start apart, edit lists, encoder priming).
   Audio and frame times are decoded from the file with PyAV (never read whole).
   Per clip ``clips/<id>/latents.npy`` float16 (S, 8, 32, 32), ``audio.npy`` float16
   (S, 50, d) and ``valid.npy`` bool (S,) (frame has a face and audio), memory-mapped
   at training time; ``manifest.json`` records each clip (source size/mtime, the
   preparation inputs, status ``ok`` or ``skipped`` with the reason) and is
   rewritten after every clip, so an interrupted run resumes where it stopped.
   Clips without a usable face or without audio are skipped and counted.
2. **Student UNet** (``musetalk.student``): BK-SDM-Tiny's reduction of the teacher,
   initialised from its matching blocks (``--student_width`` < 1 also narrows every
   channel count, beyond BK-SDM, for more speed). Loss = ``--w_out`` x MSE(student output,
   teacher output) + ``--w_feat`` x sum over BK-SDM-Tiny's feature points of
   MSE(student, teacher) (forward hooks) + ``--w_rec`` x L1(student output, the
   ground-truth frame latent). A training sample: the masked latent of frame t,
   a reference latent, the audio window of t; the target is frame t's own
   (unmasked) latent. The reference is frame t's own for a ``--same_reference``
   fraction of samples (what the server feeds: an avatar frame with its own
   reference) and another frame r != t of the clip for the rest (MuseTalk's
   training pairs); the ground-truth L1 counts only the r != t samples (with
   r = t the target is in the input), the KD losses every sample.
3. **Tiny decoder**: diffusers' ``AutoencoderTiny`` (TAESD) decoder trained with
   pixel L1 against the SD VAE decoder on the same latents (the batch's
   ground-truth latents and the teacher's predictions: what the decoder sees when
   serving). No perceptual loss: LPIPS needs torchvision's ImageNet backbone
   weights, downloaded at run time, which this project does not fetch.

Training: AdamW, gradient accumulation, bf16 autocast on CUDA (float32 on the
CPU; the teacher runs in bf16 there too), gradient clipping. Every optimizer step
appends a row of every loss to ``<out>/losses.csv``; ``--save_every`` steps write
``<out>/checkpoints/step-NNNNNNN/`` (students, optimizer states; the newest
``--keep_checkpoints`` kept); a rerun continues from the newest one (at the
rerun's learning rates; ``--no_resume`` sets the old run aside), and the batch of step n depends only on
(``--seed``, n), so a resumed run follows the same loss curve. At the end the
students are exported as ``<out>/unet`` and ``<out>/vae`` (diffusers
``save_pretrained``: ``config.json`` + ``diffusion_pytorch_model.safetensors``;
``unet/musetalk_student.json`` names the teacher's version), what
``--musetalk_unet`` / ``--musetalk_vae`` load (the teacher's ``unet.pth`` is then
not needed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python musetalk/distill.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger("musetalk.distill")

DATA_FORMAT = 2  # bump when the per-clip files or their preparation change
VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".ts"}
SIDECAR_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
CLIP_FILES = ("latents.npy", "audio.npy", "valid.npy")
FEATURE_CHUNK_FRAMES = 25  # streaming feature windows computed 1 s (25 frames) at a time, like a live stream
MAX_CLIP_SECONDS = 3600.0  # longest audio track decoded per clip
LOSS_COLUMNS = ("step", "out_kd", "feat_kd", "rec_l1", "unet_total", "vae_l1", "lr", "vae_lr", "unet_grad_norm",
                "vae_grad_norm", "seconds")
UNET_DIR, VAE_DIR = "unet", "vae"
TRAINER_STATE = "trainer.pt"


# ---------------------------------------------------------------------------
# Data


def find_videos(folder: Path) -> list[Path]:
    """Video files under ``folder`` (recursive, sorted), by suffix (:data:`VIDEO_SUFFIXES`)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def clip_id(video: Path, root: Path) -> str:
    """A stable directory name for ``video``: its path relative to ``root`` with
    unsafe characters replaced, plus 8 hex digits of that path's SHA-1."""
    rel = Path(video).relative_to(Path(root)).as_posix()  # not resolved: a symlinked video keeps its own name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0])[-60:].strip("_") or "clip"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


@dataclass
class ClipAudio:
    """A clip's audio track.

    pcm: float32 (n,) mono at 16 kHz in [-1, 1]. start: the time in seconds, on
    the clip's container clock, of ``pcm[0]``: the first decoded audio frame's
    ``time``, which already leaves out what the decoder dropped (AAC/MP3 encoder
    priming, MP4 edit lists, Matroska codec delay), so that a stream whose header
    reports a slightly negative start (AAC priming) starts where its sound does;
    None for a sidecar audio file, taken to start with the video's first frame.
    """

    pcm: np.ndarray
    start: float | None


def decode_track(path: Path, max_seconds: float = MAX_CLIP_SECONDS) -> tuple[np.ndarray, float]:
    """Decode the first audio stream of the file at ``path`` (PyAV, read from the
    file, never held whole in memory) to float32 (n,) mono 16 kHz in [-1, 1], and
    the time in seconds of its first sample (the first decoded frame's ``time``; 0
    when the container has none).

    Channels are averaged with equal weights and the rate converted by
    ``audio.StreamResampler`` (libswresample), as the server's ``audio.decode_audio``
    does for uploads. Work is bounded: FFmpeg's ``max_samples`` caps one frame, the
    rate and channel count must lie within ``audio``'s limits, and decoding stops
    past ``max_seconds`` of audio. A stream that breaks off after some audio keeps
    what was decoded (with a warning).

    Raises:
        audio.AudioTooLong: more than ``max_seconds`` of audio.
        audio.AudioDecodeError: unreadable file, no audio stream, a rate or channel
            count out of bounds, a rate that changes within the stream, no samples.
    """
    import av

    from audio import (
        MAX_CHANNELS, MAX_FRAME_VALUES, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, AudioDecodeError, AudioTooLong,
        StreamResampler,
    )

    cap = {"max_samples": str(MAX_FRAME_VALUES)}
    try:
        container = av.open(str(path), options=cap)
    except (av.FFmpegError, ValueError, OSError, EOFError) as e:
        raise AudioDecodeError(f"could not read {Path(path).name} ({e})") from e
    parts: list[np.ndarray] = []
    rate, start, seconds = 0, 0.0, 0.0
    convert = resampler = None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioDecodeError(f"{Path(path).name} has no audio stream (streams: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        stream.codec_context.options = cap
        try:
            for frame in container.decode(stream):
                if not frame.samples:
                    continue
                r, channels = int(frame.sample_rate), len(frame.layout.channels)
                if not MIN_SAMPLE_RATE <= r <= MAX_SAMPLE_RATE or not 1 <= channels <= MAX_CHANNELS:
                    raise AudioDecodeError(f"the audio stream decodes to {r} Hz x {channels} channel(s), outside "
                                           f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz x 1-{MAX_CHANNELS}")
                if frame.samples * channels > MAX_FRAME_VALUES:
                    raise AudioDecodeError(f"an audio frame of {frame.samples} x {channels} samples")
                if not rate:
                    rate, start = r, float(frame.time or 0.0)
                    convert = av.AudioResampler(format="fltp")  # any sample format -> float planar
                    resampler = StreamResampler(r)
                elif r != rate:
                    raise AudioDecodeError(f"the sample rate changes within the audio stream ({rate} -> {r} Hz)")
                seconds += frame.samples / r
                if seconds > max_seconds:
                    raise AudioTooLong(f"the audio track is longer than {max_seconds:g} s", seconds, max_seconds)
                for f in convert.resample(frame):
                    parts.append(resampler.process(f.to_ndarray().mean(axis=0, dtype=np.float32)))
        except AudioDecodeError:
            raise
        except (av.FFmpegError, ValueError, OSError, EOFError) as e:
            if not rate:
                raise AudioDecodeError(f"could not decode the audio of {Path(path).name} ({e})") from e
            log.warning("%s: the audio stream broke off after %.2f s (%s); using what was decoded", path, seconds, e)
    if not rate:
        raise AudioDecodeError(f"the audio stream of {Path(path).name} decoded to zero samples")
    for f in convert.resample(None):
        parts.append(resampler.process(f.to_ndarray().mean(axis=0, dtype=np.float32)))
    parts.append(resampler.flush())
    pcm = np.concatenate(parts)
    np.nan_to_num(pcm, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(pcm, -1.0, 1.0, out=pcm), start


def clip_audio(video: Path) -> ClipAudio:
    """A clip's audio: its first audio stream (with its start time), else a sidecar
    file with the same stem (``clip.wav``..., start None: taken to start with the
    video). Decoded from the files by :func:`decode_track`.

    Raises:
        audio.AudioDecodeError: no audio track and no readable sidecar.
    """
    from audio import AudioDecodeError

    try:
        return ClipAudio(*decode_track(video))
    except AudioDecodeError as first:
        for suffix in SIDECAR_AUDIO_SUFFIXES:
            sidecar = Path(video).with_suffix(suffix)
            if sidecar.is_file():
                return ClipAudio(decode_track(sidecar)[0], None)
        raise AudioDecodeError(f"{first} (and no sidecar {Path(video).stem}{{{','.join(SIDECAR_AUDIO_SUFFIXES)}}})")


def frame_times(video: Path, n: int, fps: float) -> np.ndarray:
    """Presentation times in seconds (float64 (n,), container clock) of the first
    ``n`` frames of ``video``'s first video stream: the decoded frames' ``time``
    (PyAV, from the file; the frames ``avatar.prepare_avatar`` read, in the same
    order). A frame without a timestamp, or frames PyAV cannot decode (with a
    warning), continue from the previous one at ``fps``. Work: at most ``n`` frames decoded.
    """
    import av

    times: list[float] = []
    step = 1.0 / (fps or 25.0)
    if n <= 0:
        return np.zeros(0, np.float64)
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                times.append(float(frame.time) if frame.time is not None else (times[-1] + step if times else 0.0))
                if len(times) == n:
                    break
    except (av.FFmpegError, IndexError, ValueError, OSError, EOFError) as e:
        log.warning("%s: no frame times from PyAV past frame %d (%s)", video, len(times), e)
    if len(times) < n:
        log.warning("%s: PyAV decoded %d of %d frames; the rest are timed at %g fps", video, len(times), n, fps)
        last = times[-1] if times else 0.0
        times += [last + step * (k + 1) for k in range(n - len(times))]
    return np.asarray(times, np.float64)


def align_audio(track: ClipAudio, times: np.ndarray) -> tuple[np.ndarray, float]:
    """A clip's audio on its video's timeline: float32 (m,) 16 kHz whose sample 0
    is at the first video frame's time ``times[0]`` (seconds, container clock, as
    :func:`frame_times`), so that frame i's audio starts at sample
    ``(times[i] - times[0]) * 16000``: audio before the first frame is dropped,
    silence stands before an audio track that starts later. Also returns the
    audio track's start minus the first frame's time in seconds (its delay;
    negative when it starts earlier; 0 for a sidecar, ``track.start`` None).

    Raises:
        ValueError: the audio starts more than :data:`MAX_CLIP_SECONDS` after the first frame.
    """
    from clock import SAMPLE_RATE

    t0 = float(times[0]) if len(times) else 0.0
    delay = 0.0 if track.start is None else track.start - t0
    if delay > MAX_CLIP_SECONDS:
        raise ValueError(f"the audio track starts {delay:.0f} s after the first video frame")
    lead = int(round(-delay * SAMPLE_RATE))  # audio samples before the first frame
    pcm = np.asarray(track.pcm, np.float32)
    pcm = pcm[lead:] if lead >= 0 else np.concatenate([np.zeros(-lead, np.float32), pcm])
    return pcm, delay


def streaming_windows(extractor, pcm: np.ndarray, n_frames: int) -> np.ndarray:
    """The server's streaming feature windows of a whole clip: float32 (n_frames, 50, d).

    The clip is fed to ``extractor`` (a ``StreamingFeatureExtractor``) as one
    utterance, :data:`FEATURE_CHUNK_FRAMES` frames (25 fps) at a time with its
    :class:`StreamState`, as the live ASR thread does; audio past the clip is zeros.
    """
    from clock import FRAME_SAMPLES
    from musetalk.audio_features import StreamState

    before, after = extractor.lookbehind_samples, extractor.lookahead_samples
    padded = np.concatenate([np.zeros(before, np.float32), np.asarray(pcm, np.float32),
                             np.zeros(n_frames * FRAME_SAMPLES + after, np.float32)])
    state, out = StreamState(), []
    for first in range(0, n_frames, FEATURE_CHUNK_FRAMES):
        n = min(FEATURE_CHUNK_FRAMES, n_frames - first)
        start = first * FRAME_SAMPLES  # == utterance sample first * 640 - before, shifted by the padding
        out.append(extractor.windows(padded[start : start + extractor.span_samples(n)], n, first, state))
    return np.concatenate(out)


@dataclass
class Preparer:
    """What every clip is prepared with (the server's own models and parameters).

    vae: the SD ``AutoencoderKL``; whisper: the Whisper ``AudioEncoder``; version:
    "v15"/"v1"; extra_margin: pixels below the chin; max_frames / resize_height:
    ``avatar.prepare_avatar``'s; batch_size: frames per VAE encode call;
    left_context_ms / right_context_ms / silence_tokens: the
    ``StreamingFeatureExtractor``'s (default: the server's defaults).
    """

    vae: nn.Module
    whisper: nn.Module
    version: str
    extra_margin: int
    max_frames: int | None = None
    resize_height: int | None = None
    batch_size: int = 8
    left_context_ms: float | None = None
    right_context_ms: float | None = None
    silence_tokens: int | None = None

    def extractor(self):
        """The ``StreamingFeatureExtractor`` every clip's audio goes through."""
        from musetalk import audio_features as af

        return af.StreamingFeatureExtractor(
            self.whisper, self.version,
            left_context_ms=af.DEFAULT_LEFT_CONTEXT_MS if self.left_context_ms is None else self.left_context_ms,
            right_context_ms=af.DEFAULT_RIGHT_CONTEXT_MS if self.right_context_ms is None else self.right_context_ms,
            silence_tokens=af.DEFAULT_SILENCE_TOKENS if self.silence_tokens is None else self.silence_tokens)

    def inputs(self) -> dict:
        """The preparation inputs recorded with every clip (a change re-prepares it):
        this module's, ``avatar``'s and ``musetalk.prepare``'s format versions, the
        options, the VAE encoder's and the Whisper encoder's identities and the
        feature extractor's context (in its own rounding) and silence tokens."""
        import avatar as avatar_mod
        from musetalk import prepare
        from musetalk.prepare import vae_identity

        h = hashlib.sha1()
        for tensor in (self.whisper.conv1.weight, self.whisper.ln_post.weight):
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        ex = self.extractor()
        return {"format": DATA_FORMAT, "avatar_format": avatar_mod.FORMAT_VERSION,
                "musetalk_format": prepare.FORMAT_VERSION, "version": self.version,
                "extra_margin": self.extra_margin, "max_frames": self.max_frames,
                "resize_height": self.resize_height, "vae": vae_identity(self.vae), "whisper": h.hexdigest(),
                "features": {"left": ex.left_features, "right": ex.right_features,
                             "silence_tokens": ex.silence_tokens}}

    def prepare_clip(self, video: Path, cid: str, out: Path, scratch: Path) -> dict:
        """Prepare one clip into ``out`` (written atomically). Returns its manifest
        entry: ``{"status": "ok", "frames": S, "valid": n, "fps": ..., "audio_delay_ms": d}``
        (d: the audio track's start after the first frame, :func:`align_audio`) or
        ``{"status": "skipped", "reason": ...}`` (no face, no audio, unreadable).

        Frame i gets the streaming window of the 25 fps frame nearest its own time
        after frame 0 (:func:`frame_times`), on the audio aligned by the streams'
        start times (:func:`align_audio`); frames before the audio starts or past
        its end are not valid.
        """
        import avatar as avatar_mod
        from audio import AudioDecodeError
        from clock import FRAME_SAMPLES, VIDEO_FPS
        from musetalk.prepare import prepare_musetalk

        try:
            track = clip_audio(video)
        except AudioDecodeError as e:
            return {"status": "skipped", "reason": f"no audio: {e}"}
        try:
            avatar_mod.prepare_avatar(video, cid, scratch, self.max_frames, self.resize_height, 0, self.extra_margin)
            av = avatar_mod.load_avatar(cid, scratch)
            fps = float(json.loads((scratch / cid / "manifest.json").read_text())["fps"])
            mav = prepare_musetalk(av, self.vae, self.version, 0, self.extra_margin, None, None, self.batch_size)
        except ValueError as e:  # "no face found", unreadable video, no usable face box
            return {"status": "skipped", "reason": f"no usable face: {e}" if "face" in str(e) else str(e)}
        finally:
            shutil.rmtree(scratch / cid, ignore_errors=True)  # frames are not needed any more
        s_count = len(mav)
        times = frame_times(video, s_count, fps or VIDEO_FPS)  # the frames' own times, not i / fps
        try:
            pcm, delay = align_audio(track, times)  # sample 0 at frame 0's time
        except ValueError as e:
            return {"status": "skipped", "reason": str(e)}
        since = times - times[0]  # seconds after frame 0
        n25 = -(-len(pcm) // FRAME_SAMPLES)  # 25 fps frames the audio covers
        at25 = np.maximum(np.round(since * VIDEO_FPS), 0).astype(np.int64)  # frame time -> 25 fps window
        valid = mav.valid & (at25 < n25) & (since >= delay - 0.5 / VIDEO_FPS)  # no frame before the audio starts
        if valid.sum() < 2:
            return {"status": "skipped", "reason": f"{int(valid.sum())} frame(s) with a face and audio (need 2)"}
        windows = streaming_windows(self.extractor(), pcm, n25)[np.minimum(at25, n25 - 1)]
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "latents.npy", mav.latents.astype(np.float16))
        np.save(tmp / "audio.npy", windows.astype(np.float16))
        np.save(tmp / "valid.npy", valid)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return {"status": "ok", "frames": s_count, "valid": int(valid.sum()), "fps": fps,
                "audio_delay_ms": round(delay * 1000, 1)}


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def prepare_dataset(videos: Path, data_dir: Path, preparer: Preparer) -> dict:
    """Prepare every video under ``videos`` into ``data_dir`` (resumable; see the module docstring).

    A clip whose manifest entry matches its source (size, mtime) and the
    preparation inputs, with its files present, is not prepared again (skipped
    clips are not retried either); clips of videos no longer under ``videos`` are
    dropped from the manifest; files under ``data_dir/clips`` of no manifest entry are deleted. Returns the manifest:
    ``{"inputs": {...}, "clips": {id: entry}, "counts": {"ok": n, "skipped": n}}``.
    Raises FileNotFoundError when ``videos`` has no video file.
    """
    videos, data_dir = Path(videos), Path(data_dir)
    files = find_videos(videos)
    if not files:
        raise FileNotFoundError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) under {videos}")
    (data_dir / "clips").mkdir(parents=True, exist_ok=True)
    scratch = data_dir / "scratch"
    path = data_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {}
    inputs = preparer.inputs()
    clips = manifest.get("clips", {}) if manifest.get("inputs") == inputs else {}
    manifest = {"inputs": inputs, "videos": str(videos.resolve()), "clips": clips}
    reused = 0
    current = [clip_id(video, videos) for video in files]
    with tqdm(list(zip(files, current)), desc="distill data", unit="clip") as bar:
        for video, cid in bar:
            stat = video.stat()
            source = {"source": str(video.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            entry = clips.get(cid)
            out = data_dir / "clips" / cid
            if entry and all(entry.get(k) == v for k, v in source.items()) and (
                entry["status"] == "skipped" or all((out / f).is_file() for f in CLIP_FILES)
            ):
                reused += 1
                continue
            start = time.perf_counter()
            result = preparer.prepare_clip(video, cid, out, scratch)
            clips[cid] = {**source, **result, "seconds": round(time.perf_counter() - start, 2)}
            if result["status"] == "skipped":
                log.warning("skipped %s: %s", video, result["reason"])
            counts = {s: sum(e["status"] == s for e in clips.values()) for s in ("ok", "skipped")}
            _write_json(path, {**manifest, "counts": counts})
            bar.set_postfix(counts)
    shutil.rmtree(scratch, ignore_errors=True)
    for cid in set(clips) - set(current):  # videos no longer under --videos: not trained on
        del clips[cid]
    for folder in (data_dir / "clips").iterdir():  # their files, and those of an interrupted clip
        if folder.name not in clips:
            shutil.rmtree(folder, ignore_errors=True)
    counts = {s: sum(e["status"] == s for e in clips.values()) for s in ("ok", "skipped")}
    manifest["counts"] = counts
    _write_json(path, manifest)
    log.info("distill data in %s: %d clips ready, %d skipped (%d reused from an earlier run)",
             data_dir, counts["ok"], counts["skipped"], reused)
    return manifest


class DistillData:
    """Training batches from a prepared ``data_dir`` (arrays memory-mapped).

    Batch ``(step, micro)`` is drawn by ``np.random.default_rng([seed, step, micro])``
    alone, so it is the same in a resumed run. Each sample: a random valid frame t
    of a random clip (clips weighted by their valid frames) and a reference frame r
    of the same clip: with probability ``same_reference`` r = t, what the server
    feeds (``MuseTalkEngine`` pairs an avatar frame's masked latent with its own
    reference latent), else r != t (MuseTalk's training pairs: the mouth cannot be
    copied from the reference). Every sample serves the KD losses; only r != t
    samples the ground-truth L1 (``rec``), since with r = t the target is in the input.

    Raises:
        FileNotFoundError: no prepared clip in ``data_dir``.
    """

    def __init__(self, data_dir: Path, seed: int = 0, same_reference: float = 0.5) -> None:
        if not 0 <= same_reference <= 1:
            raise ValueError(f"same_reference must be in [0, 1], got {same_reference}")
        self.same_reference = same_reference
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        self.clips = []
        for cid, entry in sorted(manifest["clips"].items()):
            if entry["status"] != "ok":
                continue
            folder = Path(data_dir) / "clips" / cid
            valid = np.flatnonzero(np.load(folder / "valid.npy"))
            self.clips.append((np.load(folder / "latents.npy", mmap_mode="r"),
                               np.load(folder / "audio.npy", mmap_mode="r"), valid))
        if not self.clips:
            raise FileNotFoundError(f"no prepared clip in {data_dir} (manifest counts: {manifest.get('counts')})")
        sizes = np.array([len(v) for _, _, v in self.clips], np.float64)
        self.weights = sizes / sizes.sum()
        self.seed = seed
        self.frames = int(sizes.sum())
        self.audio_dim = int(self.clips[0][1].shape[2])

    def batch(self, step: int, micro: int, batch_size: int) -> dict[str, torch.Tensor]:
        """``{"latents": (B, 8, 32, 32), "audio": (B, 50, d), "target": (B, 4, 32, 32)}`` float32 and
        ``"rec": (B,)`` bool (CPU): masked latent of t + reference latent of r; audio window of t;
        t's unmasked latent; whether r != t (the sample counts in the ground-truth L1)."""
        rng = np.random.default_rng([self.seed, step, micro])
        latents, audio, target, rec = [], [], [], []
        for c in rng.choice(len(self.clips), size=batch_size, p=self.weights):
            lat, aud, valid = self.clips[c]
            t, r = rng.choice(valid, size=2, replace=False)
            if rng.random() < self.same_reference:
                r = t
            latents.append(np.concatenate([lat[t, :4], lat[r, 4:]]))
            audio.append(aud[t])
            target.append(lat[t, 4:])
            rec.append(r != t)
        as_tensor = lambda x: torch.from_numpy(np.stack(x).astype(np.float32))  # noqa: E731
        return {"latents": as_tensor(latents), "audio": as_tensor(audio), "target": as_tensor(target),
                "rec": torch.tensor(rec, dtype=torch.bool)}


# ---------------------------------------------------------------------------
# Distillation


class _Recorder:
    """Forward hooks keeping the outputs of named submodules (a block's tuple -> its first tensor)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out


@dataclass
class LossWeights:
    """Weights of the student UNet's losses (BK-SDM: 1 each)."""

    out: float = 1.0
    feat: float = 1.0
    rec: float = 1.0


class Distiller:
    """Teacher/student pairs and their losses (no optimizer: see :func:`train`).

    Args:
        teacher: the released UNet (frozen; ``musetalk.models.load_unet``).
        student: the student ``UNet2DConditionModel`` (trainable) or None.
        vae: the SD ``AutoencoderKL`` (frozen): decoder teacher.
        tiny: the ``AutoencoderTiny`` whose decoder is trained, or None.
        pe: ``AudioPositionalEncoding`` of the audio width.
        teacher_config: the teacher's config (for :func:`musetalk.student.feature_pairs`).
        weights: :class:`LossWeights`.
        autocast: bf16 autocast (CUDA).

    Attributes:
        projections: ``nn.ModuleDict`` of 1x1 convolutions mapping a narrower
            student's features to the teacher's channels for feature KD (FitNets'
            regressors, Romero et al. 2015), trained with the student; empty when
            the student has the teacher's widths (BK-SDM-Tiny).
    """

    def __init__(self, teacher, student, vae, tiny, pe, teacher_config: dict, weights: LossWeights,
                 autocast: bool = False) -> None:
        from musetalk.student import feature_channels, feature_pairs

        self.teacher, self.student, self.vae, self.tiny, self.pe = teacher, student, vae, tiny, pe
        self.weights = weights
        self.device = next(teacher.parameters()).device
        self.autocast = autocast
        self.pairs = feature_pairs(teacher_config)
        self.projections = nn.ModuleDict()
        if student is not None:
            for s_name, t_name in self.pairs:
                c_s, c_t = feature_channels(dict(student.config), s_name), feature_channels(teacher_config, t_name)
                if c_s != c_t:
                    self.projections[s_name.replace(".", "_")] = nn.Conv2d(c_s, c_t, 1)
            self.projections.to(self.device)
        self.t_rec = _Recorder(teacher, [t for _, t in self.pairs])
        self.s_rec = _Recorder(student, [s for s, _ in self.pairs]) if student is not None else None

    def close(self) -> None:
        """Remove the forward hooks (the teacher may be shared with another Distiller)."""
        for recorder in (self.t_rec, self.s_rec):
            for handle in recorder.handles if recorder is not None else ():
                handle.remove()

    def _project(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        projection = self.projections[name.replace(".", "_")] if name.replace(".", "_") in self.projections else None
        return feature if projection is None else projection(feature)

    def _ctx(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (scalars; ``unet_total`` and ``vae_l1`` carry gradients).

        ``batch``: :meth:`DistillData.batch`'s dict (without ``rec``: every sample
        counts in the ground-truth L1). Keys: out_kd, feat_kd, rec_l1 (mean over the
        batch of the per-sample L1, zero where ``rec`` is False), unet_total (absent
        without a student UNet); vae_l1 (absent without a tiny decoder).
        """
        from musetalk.inference import VAE_SCALE

        dev = self.device
        latents, target = batch["latents"].to(dev), batch["target"].to(dev)
        t0 = torch.zeros(latents.shape[0], dtype=torch.long, device=dev)
        out: dict[str, torch.Tensor] = {}
        with self._ctx():
            tokens = self.pe(batch["audio"].to(dev, self.pe.pe.dtype))
            with torch.no_grad():
                t_pred = self.teacher(latents.to(self.teacher.dtype), t0,
                                      encoder_hidden_states=tokens.to(self.teacher.dtype)).sample.float()
            t_feats = self.t_rec.take()
            if self.student is not None:
                s_pred = self.student(latents, t0, encoder_hidden_states=tokens).sample.float()
                s_feats = self.s_rec.take()
                out["out_kd"] = F.mse_loss(s_pred, t_pred)
                out["feat_kd"] = sum(F.mse_loss(self._project(s, s_feats[s]).float(), t_feats[t].float())
                                     for s, t in self.pairs)
                # mean over the batch, zero for r = t samples: micro-batches then add up to their union
                rec = batch["rec"].to(dev) if "rec" in batch else torch.ones(len(target), dtype=torch.bool, device=dev)
                out["rec_l1"] = ((s_pred - target).abs().mean(dim=(1, 2, 3)) * rec).mean()
                w = self.weights
                out["unet_total"] = w.out * out["out_kd"] + w.feat * out["feat_kd"] + w.rec * out["rec_l1"]
            if self.tiny is not None:
                z = torch.cat([target, t_pred])  # scaled latents: ground truth and what serving decodes
                with torch.no_grad():
                    want = self.vae.decode((z / VAE_SCALE).to(self.vae.dtype)).sample.float()
                got = self.tiny.decode(z).sample.float()
                out["vae_l1"] = F.l1_loss(got, want)
        return out


def _save_folder(model, folder: Path) -> None:
    """diffusers ``save_pretrained`` in float32 safetensors (``config.json`` + weights)."""
    model.save_pretrained(folder, safe_serialization=True)


def _load_weights(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)


_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete ``<out>/checkpoints/step-N`` folders (trainer state written; not
    an unfinished ``step-N.tmp``) as (N, folder), by N ascending."""
    found = []
    for folder in (Path(out) / "checkpoints").glob("step-*"):
        m = _CHECKPOINT_NAME.fullmatch(folder.name)
        if m and (folder / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), folder))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (see :func:`checkpoints`), or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def _set_aside(out: Path) -> None:
    """``--no_resume``: an earlier run's checkpoints and loss log go to
    ``checkpoints.previous`` / ``losses.previous.csv`` (replacing older ones), so
    that this run neither resumes from nor prunes against them, nor mixes logs."""
    for name, aside in (("checkpoints", "checkpoints.previous"), ("losses.csv", "losses.previous.csv")):
        if (out / name).exists():
            if (out / aside).is_dir():
                shutil.rmtree(out / aside)
            os.replace(out / name, out / aside)
            log.warning("--no_resume: the earlier run's %s moved to %s", name, out / aside)


def _save_checkpoint(out: Path, step: int, student, tiny, optimizers: dict, keep: int,
                     projections: nn.Module | None = None) -> Path:
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if student is not None:
        _save_folder(student, tmp / UNET_DIR)
    if tiny is not None:
        _save_folder(tiny, tmp / VAE_DIR)
    torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "projections": projections.state_dict() if projections is not None else {}}, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for leftover in (out / "checkpoints").glob("step-*.tmp"):  # an interrupted save's
        shutil.rmtree(leftover, ignore_errors=True)
    for _, old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trim_log(path: Path, step: int) -> None:
    """Keep the header and the rows of steps <= ``step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)


def read_log(path: Path) -> list[dict[str, float]]:
    """The rows of a ``losses.csv`` as floats (empty cells -> NaN)."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass
class TrainOptions:
    """Training options (see ``--help``)."""

    steps: int = 10000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    vae_lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    save_every: int = 1000
    keep_checkpoints: int = 2
    fixed_batch: bool = False
    resume: bool = True
    teacher_version: str | None = None  # "v15"/"v1": recorded with the exported UNet


def build_students(teacher, teacher_config: dict, device, train_unet: bool, train_vae: bool,
                   tiny_size: str = "full", init_vae: Path | None = None, width: float = 1.0):
    """(student UNet or None, AutoencoderTiny or None, init report) in float32 on ``device``.

    The student UNet is built from :func:`musetalk.student.student_unet_config` (``width``) and
    initialised from the teacher's weights (:func:`musetalk.student.init_from_teacher`); the
    tiny decoder from ``init_vae`` (an AutoencoderTiny folder, e.g. TAESD) or at random.
    """
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from musetalk.student import init_from_teacher, student_unet_config, tiny_vae_config

    student = tiny = None
    report: dict = {}
    if train_unet:
        student = UNet2DConditionModel.from_config(student_unet_config(teacher_config, width))
        init = init_from_teacher(student, teacher.state_dict(), teacher_config)
        report["unet_init"] = init
        log.info("student UNet: %.1fM parameters (teacher %.1fM); of %d tensors %d copied from the teacher, "
                 "%d from its leading channels", sum(p.numel() for p in student.parameters()) / 1e6,
                 sum(p.numel() for p in teacher.parameters()) / 1e6, init["total"], init["copied"], init["sliced"])
        student = nn.Module.to(student, device=device, dtype=torch.float32).train()
    if train_vae:
        if init_vae is not None:
            tiny = AutoencoderTiny.from_pretrained(init_vae, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        else:
            tiny = AutoencoderTiny.from_config(tiny_vae_config(tiny_size))
        tiny = nn.Module.to(tiny, device=device, dtype=torch.float32).train()
        tiny.encoder.requires_grad_(False)  # only the decoder is distilled; the SD encoder encodes
    return student, tiny, report


def train(distiller: Distiller, data: DistillData, out: Path, opts: TrainOptions) -> dict:
    """Run (or resume) distillation to ``opts.steps`` optimizer steps.

    Writes ``<out>/losses.csv`` (one row per optimizer step, columns
    :data:`LOSS_COLUMNS`: losses are means over the accumulated micro-batches;
    ``lr``/``vae_lr`` the optimizers' rates used; grad norms before clipping),
    checkpoints every ``save_every`` steps and at the end, and exports
    ``<out>/unet`` and ``<out>/vae``. With ``opts.resume`` it continues from the
    newest complete checkpoint, at the learning rates of ``opts`` (not the
    checkpoint's); without, an earlier run's checkpoints and log are set aside
    (``checkpoints.previous``, ``losses.previous.csv``). Returns
    ``{"start_step", "steps", "last": last row}``.

    Raises:
        ValueError: the newest checkpoint is unreadable or does not fit these
            students or optimizers.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student, tiny = distiller.student, distiller.tiny
    optimizers: dict[str, torch.optim.Optimizer] = {}
    rates = {"unet": opts.lr, "vae": opts.vae_lr}
    if student is not None:
        optimizers["unet"] = torch.optim.AdamW([*student.parameters(), *distiller.projections.parameters()],
                                               lr=opts.lr, weight_decay=opts.weight_decay)
    if tiny is not None:
        optimizers["vae"] = torch.optim.AdamW(tiny.decoder.parameters(), lr=opts.vae_lr,
                                              weight_decay=opts.weight_decay)
    start = 0
    if not opts.resume:
        _set_aside(out)
    ckpt = latest_checkpoint(out) if opts.resume else None
    if ckpt is not None:
        try:
            state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: torch/pickle/zip raise many types
            raise ValueError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {str(e)[:200]}); delete that "
                             f"folder to resume from the one before it, or use --no_resume") from e
        try:
            if student is not None:
                _load_weights(student, ckpt / UNET_DIR)
            if tiny is not None:
                _load_weights(tiny, ckpt / VAE_DIR)
            distiller.projections.load_state_dict(state.get("projections", {}))
            for key, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
                for group in opt.param_groups:  # this run's options win over the checkpoint's
                    group["lr"], group["weight_decay"] = rates[key], opts.weight_decay
            start = int(state["step"])
        except (RuntimeError, KeyError, ValueError, OSError, TypeError) as e:
            raise ValueError(f"checkpoint {ckpt} does not match these options (--train, --student_width, "
                             f"--tiny_size?): {str(e)[:300]}; use another --out or --no_resume") from e
        log.info("resumed from %s (step %d)", ckpt, start)
    log_path = out / "losses.csv"
    _trim_log(log_path, start)
    new_log = not log_path.is_file() or log_path.stat().st_size == 0
    params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in optimizers.items()}
    last: dict = {}
    with log_path.open("a", newline="") as f, tqdm(total=opts.steps, initial=start, desc="distill", unit="step") as bar:
        writer = csv.DictWriter(f, LOSS_COLUMNS)
        if new_log:
            writer.writeheader()
        for step in range(start, opts.steps):
            t_start = time.perf_counter()
            sums: dict[str, float] = {}
            for micro in range(opts.grad_accum):
                batch = data.batch(0 if opts.fixed_batch else step, micro, opts.batch_size)
                losses = distiller.losses(batch)
                total = sum(losses[k] for k in ("unet_total", "vae_l1") if k in losses)
                (total / opts.grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / opts.grad_accum
            norms = {}
            for key, opt in optimizers.items():
                limit = opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf")
                norms[key] = float(torch.nn.utils.clip_grad_norm_(params[key], limit))
                opt.step()
                opt.zero_grad(set_to_none=True)
            done = step + 1
            last = {"step": done, **{k: sums.get(k, "") for k in LOSS_COLUMNS[1:6]},
                    "lr": optimizers["unet"].param_groups[0]["lr"] if "unet" in optimizers else "",
                    "vae_lr": optimizers["vae"].param_groups[0]["lr"] if "vae" in optimizers else "",
                    "unet_grad_norm": norms.get("unet", ""), "vae_grad_norm": norms.get("vae", ""),
                    "seconds": round(time.perf_counter() - t_start, 4)}
            writer.writerow(last)
            f.flush()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items() if k in ("unet_total", "vae_l1")})
            if done % opts.save_every == 0 or done == opts.steps:
                _save_checkpoint(out, done, student, tiny, optimizers, opts.keep_checkpoints, distiller.projections)
    export(out, student, tiny, opts.teacher_version)
    return {"start_step": start, "steps": opts.steps, "last": last}


def export(out: Path, student, tiny, teacher_version: str | None = None) -> None:
    """Write the students where the server loads them: ``<out>/unet``, ``<out>/vae``;
    with ``teacher_version``, ``unet/`` also gets ``musetalk.models.STUDENT_INFO_NAME``
    (``{"teacher_version": ...}``), which ``load_unet_folder`` checks against ``--musetalk_version``."""
    from musetalk.models import STUDENT_INFO_NAME

    for model, name in ((student, UNET_DIR), (tiny, VAE_DIR)):
        if model is None:
            continue
        tmp = out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save_folder(model, tmp)
        if name == UNET_DIR and teacher_version is not None:
            _write_json(tmp / STUDENT_INFO_NAME, {"teacher_version": teacher_version})
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m musetalk.distill",
        description="Distil MuseTalk's UNet into a BK-SDM-Tiny-shaped student and the SD VAE decoder into a "
        "tiny (TAESD) decoder, on talking-head videos prepared with the server's own MuseTalk preparation. "
        "Serve the result with: python app.py --model musetalk --musetalk_unet OUT/unet --musetalk_vae OUT/vae",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--videos", type=Path, required=True,
                   help="folder of talking-head videos (searched recursively; audio from the video's track "
                   "or a sidecar file with the same stem, e.g. clip.wav)")
    g.add_argument("--models_dir", type=Path, default=Path("models"), help="released MuseTalk weights (the teacher)")
    g.add_argument("--version", default="v15", choices=["v15", "v1"], help="MuseTalk weights version")
    g.add_argument("--out", type=Path, required=True, help="output folder: data/, checkpoints/, losses.csv, unet/, vae/")
    g.add_argument("--data_dir", type=Path, help="prepared-data cache (default OUT/data; shareable between runs)")
    g.add_argument("--max_frames", type=int, help="use at most this many frames of each clip")
    g.add_argument("--resize_height", type=int, help="scale frames to this height before landmark detection")
    g.add_argument("--extra_margin", type=int, help="pixels below the chin (default: 10 for v15, 0 for v1)")
    g.add_argument("--prepare_batch", type=int, default=8, help="frames per VAE encode call while preparing")
    g.add_argument("--prepare_only", action="store_true", help="prepare the data and stop")
    g = p.add_argument_group("training")
    g.add_argument("--train", default="both", choices=["both", "unet", "vae"], help="which students to train")
    g.add_argument("--steps", type=int, default=10000, help="optimizer steps in all (a resumed run continues to it)")
    g.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5,
                   help="student UNet learning rate (AdamW; BK-SDM: 5e-5); a resumed run uses this one")
    g.add_argument("--vae_lr", type=float, default=1e-4, help="tiny decoder learning rate (AdamW); likewise")
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--w_out", type=float, default=1.0, help="weight of the output KD loss (MSE to the teacher)")
    g.add_argument("--w_feat", type=float, default=1.0, help="weight of the feature KD loss (BK-SDM-Tiny points)")
    g.add_argument("--w_rec", type=float, default=1.0,
                   help="weight of the L1 to the ground-truth frame latent (averaged over the batch, zero for "
                   "samples whose reference is their own frame)")
    g.add_argument("--same_reference", type=float, default=0.5,
                   help="fraction of samples whose reference latent is the frame itself, as the server feeds "
                   "them (KD only); the others take another frame of the clip (KD and ground-truth L1)")
    g.add_argument("--student_width", type=float, default=1.0,
                   help="channel multiplier of the student UNet: 1.0 is BK-SDM-Tiny exactly (~1.7x fewer MACs "
                   "than the teacher at 32x32); 0.6 gives channels 192/384/768 (~4.4x fewer; feature KD through "
                   "1x1 projections)")
    g.add_argument("--init_vae", type=Path, help="start the tiny decoder from this AutoencoderTiny folder (e.g. TAESD)")
    g.add_argument("--tiny_size", default="full", choices=["full", "tiny"],
                   help="tiny decoder widths: TAESD's (full) or test widths (tiny)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast (teacher in bf16) on CUDA, fp32 on the CPU")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="checkpoints kept (oldest deleted)")
    g.add_argument("--no_resume", action="store_true",
                   help="start from scratch even if OUT has checkpoints (they and losses.csv are moved to "
                   "OUT/checkpoints.previous and OUT/losses.previous.csv, replacing older ones)")
    g.add_argument("--fixed_batch", action="store_true", help="train on step 0's batch every step (a sanity check)")
    g.add_argument("--seed", type=int, default=0, help="seeds the batches and the students' initialisation")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from musetalk.models import AudioPositionalEncoding, MissingWeightsError, find_weights, load_unet, load_vae, \
        load_whisper_encoder
    from musetalk.prepare import VERSIONS

    if args.steps < 0 or args.batch_size < 1 or args.grad_accum < 1 or args.save_every < 1 or not (
            0 <= args.same_reference <= 1):
        print("--steps >= 0, --batch_size, --grad_accum and --save_every >= 1, 0 <= --same_reference <= 1",
              file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    frozen_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    extra_margin = VERSIONS[args.version]["extra_margin"] if args.extra_margin is None else args.extra_margin
    torch.manual_seed(args.seed)
    try:
        paths = find_weights(args.models_dir, args.version)
        vae = load_vae(paths, device, torch.float32)  # encodes in float32 (preparation), then frozen_dtype
        whisper = load_whisper_encoder(paths, device, torch.float32)
        data_dir = args.data_dir or args.out / "data"
        preparer = Preparer(vae, whisper, paths.version, extra_margin, args.max_frames, args.resize_height,
                            args.prepare_batch)
        prepare_dataset(args.videos, data_dir, preparer)
        if args.prepare_only:
            return 0
        data = DistillData(data_dir, args.seed, args.same_reference)
        teacher_config = json.loads(paths.unet_config.read_text())
        teacher = load_unet(paths, device, torch.float32)
        student, tiny, report = build_students(teacher, teacher_config, device, args.train != "vae",
                                               args.train != "unet", args.tiny_size, args.init_vae,
                                               args.student_width)
        teacher = nn.Module.to(teacher, dtype=frozen_dtype)
        vae = nn.Module.to(vae, dtype=frozen_dtype)
    except (FileNotFoundError, ValueError, MissingWeightsError) as e:
        log.error("%s", e)
        return 1
    pe = AudioPositionalEncoding(teacher_config["cross_attention_dim"]).to(device)
    weights = LossWeights(args.w_out, args.w_feat, args.w_rec)
    distiller = Distiller(teacher, student, vae, tiny, pe, teacher_config, weights, autocast=precision == "bf16")
    opts = TrainOptions(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        vae_lr=args.vae_lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
                        fixed_batch=args.fixed_batch, resume=not args.no_resume, teacher_version=paths.version)
    log.info("distilling on %s (%s): %d clips, %d frames; %d steps of %d x %d samples", device, precision,
             len(data.clips), data.frames, args.steps, args.batch_size, args.grad_accum)
    try:
        result = train(distiller, data, args.out, opts)
    except ValueError as e:
        log.error("%s", e)
        return 1
    summary = {"teacher": str(paths.unet_weights), "version": paths.version, "precision": precision,
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               **report, **result}
    _write_json(args.out / "distill.json", summary)
    served = " ".join(f"--musetalk_{n} {args.out / n}" for n in (UNET_DIR, VAE_DIR) if (args.out / n).is_dir())
    print(f"done: {result['steps']} steps; serve with: python app.py --model musetalk --models_dir {args.models_dir} "
          f"{served}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
