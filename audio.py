"""Decoding and resampling of user-supplied audio.

Everything downstream (ASR, lip-sync features, the WebRTC audio track) works on
mono float32 PCM at ``SAMPLE_RATE`` (16 kHz) in [-1, 1]. This module turns
whatever the user uploads (wav, mp3, ogg/opus, flac, m4a, webm, ...) into that,
using PyAV (FFmpeg) to demux/decode and ``scipy.signal.resample_poly`` to
change the sample rate.
"""

from __future__ import annotations

import io
import logging
from math import gcd

import av
import numpy as np
from scipy.signal import resample_poly

from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "AudioDecodeError",
    "PCM_FORMATS",
    "StreamResampler",
    "decode_audio",
    "pcm_to_mono",
    "resample",
]

# Raw PCM sample formats of live streams: name -> numpy dtype (little-endian).
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}

logger = logging.getLogger(__name__)

# Scale factors that map each integer sample format to [-1, 1).
_INT_SCALE = {
    "s16": 32768.0,
    "s32": 2147483648.0,
    "s64": 9223372036854775808.0,
}


class AudioDecodeError(ValueError):
    """The given bytes could not be turned into usable audio.

    Raised for empty input, data no decoder understands, containers without an
    audio stream, streams that decode to zero samples, and audio longer than the
    allowed maximum. The message says which, in words a user can act on.
    """


def resample(pcm: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample PCM from ``sr_in`` Hz to ``sr_out`` Hz with a polyphase filter.

    Args:
        pcm: samples along axis 0, shape (samples,) or (samples, channels);
            any real dtype (converted to float32, not rescaled).
        sr_in: input sample rate in Hz (> 0).
        sr_out: output sample rate in Hz (> 0); default 16000.

    Returns:
        float32 array with ``round(samples * sr_out / sr_in)`` samples along
        axis 0 (``ceil`` for non-integer ratios, as ``resample_poly`` does) and
        the same trailing shape. Returns a float32 copy when the rates match.

    Raises:
        ValueError: a sample rate is not a positive integer.
    """
    sr_in_i, sr_out_i = int(sr_in), int(sr_out)
    if sr_in_i != sr_in or sr_out_i != sr_out or sr_in_i <= 0 or sr_out_i <= 0:
        raise ValueError(
            f"sample rates must be positive integers, got sr_in={sr_in!r}, sr_out={sr_out!r}"
        )
    x = np.asarray(pcm, dtype=np.float32)
    if sr_in_i == sr_out_i or x.shape[0] == 0:
        if sr_in_i == sr_out_i:
            return x.copy()
        return np.zeros((0,) + x.shape[1:], dtype=np.float32)
    g = gcd(sr_in_i, sr_out_i)
    up, down = sr_out_i // g, sr_in_i // g
    y = resample_poly(x, up, down, axis=0)
    return np.asarray(y, dtype=np.float32)


def pcm_to_mono(data: bytes, fmt: str, channels: int) -> np.ndarray:
    """Raw interleaved PCM bytes -> mono float32 (samples,) in [-1, 1].

    Args:
        data: interleaved little-endian samples, a whole number of sample frames.
        fmt: "s16le" (scaled by 1/32768) or "f32le" (NaN -> 0, clipped to [-1, 1]).
        channels: 1 or more; channels are averaged (equal weights).

    Raises:
        ValueError: unknown format, or a length that is not a whole number of frames.
    """
    dtype = PCM_FORMATS.get(fmt)
    if dtype is None:
        raise ValueError(f"unknown PCM format {fmt!r}; expected one of {sorted(PCM_FORMATS)}")
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise ValueError(f"{len(data)} bytes is not a whole number of {frame_bytes}-byte sample frames ({fmt}, {channels} ch)")
    x = np.frombuffer(data, dtype=dtype).reshape(-1, channels)
    if fmt == "s16le":
        mono = x.mean(axis=1, dtype=np.float32) / np.float32(32768.0)
    else:
        mono = x.mean(axis=1, dtype=np.float32)
        np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(mono, -1.0, 1.0, out=mono)
    return mono


class StreamResampler:
    """Streaming resampler for live audio: chunks in, chunks out, state carried across
    chunk edges, so no sample is lost, duplicated or clicked at a boundary.

    A thin wrapper of FFmpeg's libswresample (PyAV's ``av.AudioResampler``, a
    polyphase filter whose cost per sample does not depend on the ratio of the
    rates). Chosen over ``soxr.ResampleStream`` for live input: libsoxr releases its
    output in blocks (its "HQ" setting held the first 40 ms of a 24 kHz stream fed in
    10 ms chunks, and 120 ms of an 8 kHz one), while libswresample lags by ~1 ms
    (16 output samples) and returns every chunk's worth at once. :meth:`flush`
    returns the held tail, after which the total output is exactly
    ``round(total_in * rate_out / rate_in)`` samples.

    Args:
        rate_in: input sample rate (Hz, > 0).
        rate_out: output sample rate (Hz, > 0; default 16000).
    """

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE) -> None:
        if int(rate_in) != rate_in or int(rate_out) != rate_out or rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive integers, got {rate_in!r} -> {rate_out!r}")
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self._resampler = None
        if self.rate_in != self.rate_out:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate_out)

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """float32 (n,) at ``rate_in`` -> float32 (m,) at ``rate_out`` (m may be 0)."""
        x = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
        if self._resampler is None:
            return x[0].copy()
        if x.shape[1] == 0:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate = self.rate_in
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The output still held in the filter (end of stream); the resampler is then spent."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames: list) -> np.ndarray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)


def _reason(exc: BaseException) -> str:
    """Short human-readable cause of a PyAV/FFmpeg error."""
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Convert one decoded frame to mono float32 (samples,) at its own rate.

    Channels are averaged (equal weights), integer formats are scaled to
    [-1, 1), float formats are taken as they are.
    """
    fmt = frame.format
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels) or 1
    if fmt.is_planar:
        arr = arr.reshape(channels, -1)  # (channels, samples)
    else:
        arr = arr.reshape(-1, channels).T  # packed (1, samples*ch) -> (channels, samples)
    base = fmt.name.rstrip("p") if fmt.is_planar else fmt.name
    if base == "u8":
        data = (arr.astype(np.float32) - 128.0) / 128.0
    elif base in _INT_SCALE:
        data = arr.astype(np.float32) / np.float32(_INT_SCALE[base])
    elif base in ("flt", "dbl"):
        data = arr.astype(np.float32, copy=False)
    else:  # pragma: no cover - FFmpeg has no other sample formats today
        raise AudioDecodeError(f"unsupported sample format {fmt.name!r}")
    if data.shape[0] == 1:
        return data[0]
    return data.mean(axis=0, dtype=np.float32)


def decode_audio(data: bytes, max_seconds: float = 300.0) -> np.ndarray:
    """Decode an audio file held in memory to mono 16 kHz float32 PCM.

    Any container/codec FFmpeg (through PyAV) can read is accepted: wav, mp3,
    ogg/vorbis, ogg/opus, flac, m4a/aac, webm, and video files that carry an
    audio track (the first audio stream is used). Channels are averaged to
    mono and the result is resampled to ``SAMPLE_RATE`` (16000 Hz).

    Args:
        data: the whole file (bytes, bytearray or memoryview).
        max_seconds: longest accepted duration in seconds of decoded audio.
            Decoding stops, with an error, as soon as this is exceeded.

    Returns:
        float32 array of shape (samples,) at 16000 Hz, values clipped to
        [-1, 1].

    Raises:
        AudioDecodeError: the data is empty, cannot be opened/decoded, has no
            audio stream, decodes to zero samples, or lasts longer than
            ``max_seconds``. If the stream breaks after some audio has been
            decoded (e.g. a truncated upload), the audio decoded so far is
            returned and a warning is logged.
    """
    if data is None or len(data) == 0:
        raise AudioDecodeError("no audio data: the upload is empty (0 bytes)")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")

    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r")
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise AudioDecodeError(
            "could not read the audio: not a recognised audio/video file "
            f"({_reason(exc)})"
        ) from exc

    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioDecodeError(
                "the file has no audio stream (streams found: " + ", ".join(kinds) + ")"
            )
        stream = container.streams.audio[0]

        runs: list[tuple[int, list[np.ndarray]]] = []  # (rate, chunks) per constant-rate run
        seconds = 0.0
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                rate = int(frame.sample_rate)
                if rate <= 0:
                    raise AudioDecodeError(f"the audio stream reports an invalid sample rate ({rate})")
                mono = _frame_to_mono(frame)
                if not runs or runs[-1][0] != rate:
                    runs.append((rate, []))
                runs[-1][1].append(mono)
                seconds += mono.shape[0] / rate
                if seconds > max_seconds:
                    raise AudioDecodeError(
                        f"the audio is too long: more than {max_seconds:g} s "
                        f"(the limit is {max_seconds:g} s)"
                    )
        except AudioDecodeError:
            raise
        except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
            if not runs:
                raise AudioDecodeError(
                    f"could not decode the audio stream ({_reason(exc)})"
                ) from exc
            logger.warning(
                "audio stream broke off after %.2f s of audio (%s); using what was decoded",
                seconds,
                _reason(exc),
            )

    if not runs:
        raise AudioDecodeError("the audio stream decoded to zero samples")

    parts = [resample(np.concatenate(chunks), rate, SAMPLE_RATE) for rate, chunks in runs]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if out.shape[0] == 0:
        raise AudioDecodeError("the audio stream decoded to zero samples")
    np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(out, -1.0, 1.0, out=out)
    return out
