"""Decoding and resampling of user-supplied audio.

Everything downstream (ASR, lip-sync features, the WebRTC audio track) works on
mono float32 PCM at ``SAMPLE_RATE`` (16 kHz) in [-1, 1]. This module turns
whatever the user uploads (wav, mp3, ogg/opus, flac, m4a, webm, ...) into that,
using PyAV (FFmpeg) to demux and decode and FFmpeg's libswresample (through
PyAV) to change the sample rate, for uploads, TTS output and live streams alike.

Uploads are untrusted: every limit below is checked against what the file
declares (its headers, before anything is decoded) and again against what is
decoded, so that work and memory stay proportional to the size of the upload
whatever its headers say.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import av
import numpy as np

from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "AudioDecodeError",
    "AudioTooLong",
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "PCM_FORMATS",
    "StreamResampler",
    "WavHeader",
    "decode_audio",
    "parse_wav_header",
    "pcm_to_mono",
    "resample",
]

# Raw PCM sample formats of live streams: name -> numpy dtype (little-endian).
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}

# What an upload may declare or decode to: speech, not arbitrary signals.
MIN_SAMPLE_RATE = 8_000  # Hz; telephone speech
MAX_SAMPLE_RATE = 192_000  # Hz; the highest rate of studio formats
MAX_CHANNELS = 8  # 7.1
# Decoding work per byte of upload, in decoded values (samples x channels). Real
# speech stays below: opus at 6 kb/s decodes to 64 per byte (128 in stereo), wav
# and flac to under 2; only long digital silence or a crafted file comes near.
MAX_VALUES_PER_BYTE = 256
MIN_VALUE_BUDGET = 1 << 23  # values any upload may decode to (87 s of 48 kHz stereo)
MAX_FRAME_VALUES = 1 << 22  # values in one decoded frame (FFmpeg's decoder option max_samples)
MAX_RATE_RUNS = 16  # stretches of constant sample rate in one stream (chained ogg, joined mp3)
MAX_RATE_RATIO = 64  # resample(): the largest ratio of the two rates
# Containers whose duration comes from a header field rather than an estimate from
# the bit rate (FFmpeg's names; mp3 and adts aac without an index are estimated).
_HEADER_DURATION_FORMATS = frozenset(
    ["flac", "ogg", "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm",
     "aiff", "caf", "w64", "wv"]
)
_RESAMPLE_BLOCK = 1 << 15  # mono samples gathered before one call into the resampler

logger = logging.getLogger(__name__)

# Scale factors that map each integer sample format to [-1, 1).
_INT_SCALE = {
    "s16": 32768.0,
    "s32": 2147483648.0,
    "s64": 9223372036854775808.0,
}


class AudioDecodeError(ValueError):
    """The given bytes could not be turned into usable audio (HTTP 400).

    Raised for empty input, data no decoder understands, containers without an
    audio stream, headers that cannot describe speech or contradict the data
    (sample rate, channels, sizes), files that decode to far more audio than
    their size can hold, and streams that decode to zero samples. The message
    says which, in words a user can act on.
    """


class AudioTooLong(AudioDecodeError):
    """The audio lasts longer than the allowed maximum (HTTP 413).

    Raised before decoding when the file's header declares more than the
    limit, or during decoding as soon as the decoded audio exceeds it.

    Attributes:
        seconds: the declared duration, or the decoded duration when decoding
            stopped (a lower bound of the true one), in seconds.
        limit_s: the limit in seconds.
    """

    def __init__(self, message: str, seconds: float, limit_s: float) -> None:
        super().__init__(message)
        self.seconds = float(seconds)
        self.limit_s = float(limit_s)


def _tail_pad(rate_in: int, rate_out: int) -> int:
    """Input samples of silence that push the resampling filter's whole tail out.

    libswresample's filter spans 32 taps at the lower of the two rates, i.e.
    ``32 / min(1, 0.97 * rate_out / rate_in)`` input samples; this is more.
    """
    return 64 * -(-rate_in // rate_out) + 64


class _RunResampler:
    """Resamples one constant-rate run of mono float32 audio handed over in pieces.

    :meth:`finish` returns exactly ``ceil(n_in * rate_out / rate_in)`` samples
    (the run's input taken as followed by silence), whatever the piece sizes.
    Work is proportional to the samples in and out, not to the ratio of the
    rates (libswresample, through :class:`StreamResampler`).
    """

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in, self.rate_out = rate_in, rate_out
        self.n_in = 0  # input samples so far
        self._stream = StreamResampler(rate_in, rate_out)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._out: list[np.ndarray] = []

    def push(self, mono: np.ndarray) -> None:
        """Append ``mono`` (float32 (n,)) to the run."""
        self._pending.append(mono)
        self._n_pending += mono.shape[0]
        self.n_in += mono.shape[0]
        if self._n_pending >= _RESAMPLE_BLOCK:
            self._drain()

    def _drain(self) -> None:
        if not self._pending:
            return
        x = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending, self._n_pending = [], 0
        self._out.append(self._stream.process(x))

    def finish(self) -> np.ndarray:
        """The whole run at ``rate_out``: float32 (ceil(n_in * rate_out / rate_in),)."""
        self._drain()
        target = -(-self.n_in * self.rate_out // self.rate_in)
        self._out.append(self._stream.process(np.zeros(_tail_pad(self.rate_in, self.rate_out), np.float32)))
        self._out.append(self._stream.flush())
        y = np.concatenate(self._out)
        self._out = []
        if y.shape[0] < target:  # never seen; kept so the length contract holds regardless
            y = np.concatenate([y, np.zeros(target - y.shape[0], np.float32)])
        return y[:target].copy() if y.shape[0] > target else y


def resample(pcm: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample PCM from ``sr_in`` Hz to ``sr_out`` Hz (libswresample, polyphase).

    The same filter serves uploads, TTS output and live streams
    (:class:`StreamResampler`); its cost is proportional to the samples in and
    out and does not depend on the ratio of the rates (no gcd-sized filter).
    The input is taken as silent after its last sample (libswresample mirrors
    it before the first, so a signal does not fade in).

    Args:
        pcm: samples along axis 0, shape (samples,) or (samples, channels...);
            any real dtype (converted to float32, not rescaled).
        sr_in: input sample rate in Hz (> 0).
        sr_out: output sample rate in Hz (> 0); default 16000.

    Returns:
        float32 array with exactly ``ceil(samples * sr_out / sr_in)`` samples
        along axis 0 and the same trailing shape. Returns a float32 copy when
        the rates match.

    Raises:
        ValueError: a sample rate is not a positive integer, or one rate is
            more than ``MAX_RATE_RATIO`` (64) times the other (the anti-aliasing
            filter would grow with the ratio).
    """
    sr_in_i, sr_out_i = int(sr_in), int(sr_out)
    if sr_in_i != sr_in or sr_out_i != sr_out or sr_in_i <= 0 or sr_out_i <= 0:
        raise ValueError(
            f"sample rates must be positive integers, got sr_in={sr_in!r}, sr_out={sr_out!r}"
        )
    if max(sr_in_i, sr_out_i) > MAX_RATE_RATIO * min(sr_in_i, sr_out_i):
        raise ValueError(
            f"cannot resample {sr_in_i} Hz to {sr_out_i} Hz: the rates differ by more "
            f"than a factor of {MAX_RATE_RATIO}"
        )
    x = np.asarray(pcm, dtype=np.float32)
    if sr_in_i == sr_out_i:
        return x.copy()
    n_out = -(-x.shape[0] * sr_out_i // sr_in_i)
    if x.shape[0] == 0:
        return np.zeros((0,) + x.shape[1:], dtype=np.float32)
    if x.ndim == 1:
        run = _RunResampler(sr_in_i, sr_out_i)
        run.push(np.ascontiguousarray(x))
        return run.finish()
    cols = x.reshape(x.shape[0], -1)
    out = np.empty((n_out, cols.shape[1]), dtype=np.float32)
    for c in range(cols.shape[1]):
        run = _RunResampler(sr_in_i, sr_out_i)
        run.push(np.ascontiguousarray(cols[:, c]))
        out[:, c] = run.finish()
    return out.reshape((n_out,) + x.shape[1:])



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
    [-1, 1), float formats are taken as they are. The caller has bounded the
    frame's size (samples x channels <= ``MAX_FRAME_VALUES``).
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


# --------------------------------------------------------------------------- limits


def _check_rate(rate: int, what: str) -> None:
    """Raise AudioDecodeError unless ``MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE`` (Hz)."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"{what} a sample rate of {rate} Hz; speech audio must be sampled at "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (re-export it at 16000 or 48000 Hz)"
        )


def _check_channels(channels: int, what: str) -> None:
    """Raise AudioDecodeError unless ``1 <= channels <= MAX_CHANNELS``."""
    if channels < 1:
        raise AudioDecodeError(f"{what} {channels} audio channels; a file needs at least one")
    if channels > MAX_CHANNELS:
        raise AudioDecodeError(
            f"{what} {channels} audio channels; at most {MAX_CHANNELS} are accepted "
            "(mix it down to mono or stereo)"
        )


def _too_long(seconds: float, limit: float, verb: str | None = None) -> AudioTooLong:
    """AudioTooLong for ``seconds`` of audio that the file ``verb`` ("declares",
    "holds"; None: decoded so far) against ``limit`` seconds."""
    said = f"the file {verb} {seconds:.1f} s" if verb else f"more than {limit:g} s"
    return AudioTooLong(
        f"the audio is too long: {said} (the limit is {limit:g} s); trim it or send it in parts",
        seconds, limit,
    )


# --------------------------------------------------------------------------- WAV headers

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_ALAW = 0x0006
_WAVE_FORMAT_MULAW = 0x0007
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# Tags whose sample frames are channels x ceil(bits / 8) bytes, so sizes give durations.
_WAVE_FIXED_FRAME_TAGS = frozenset(
    [_WAVE_FORMAT_PCM, _WAVE_FORMAT_IEEE_FLOAT, _WAVE_FORMAT_ALAW, _WAVE_FORMAT_MULAW]
)
_DATA_SIZE_UNKNOWN = (0, 0xFFFFFFFF)  # data sizes that streaming writers use for "until EOF"
_ID3V1_SIZE = 128  # an ID3v1 tag ("TAG" + 125 bytes) that some tools append after the chunks


@dataclass(frozen=True)
class WavHeader:
    """What a RIFF/WAVE file declares, and how much of its data it holds.

    Sizes are in bytes, ``sample_rate`` in Hz. ``format_tag`` is the wave
    format tag (1 PCM, 3 float, 6 A-law, 7 mu-law, ...), the sub-format's tag
    for ``WAVE_FORMAT_EXTENSIBLE``. ``data_declared`` is the data chunk's
    declared size, None when it says "until the end of the file" (0 or
    0xFFFFFFFF, written by streaming writers). ``data_present`` is how much of
    the data chunk the file holds. ``trailing_junk`` counts the bytes after
    the declared data chunk that are neither RIFF chunks nor a tag or padding
    (more audio than the header declares, or garbage).
    """

    format_tag: int
    channels: int
    sample_rate: int
    byte_rate: int
    block_align: int
    bits_per_sample: int
    data_offset: int
    data_declared: int | None
    data_present: int
    trailing_junk: int

    @property
    def frame_bytes(self) -> int | None:
        """Bytes of one sample frame for fixed-frame formats (PCM, float, A/mu-law), else None."""
        if self.format_tag not in _WAVE_FIXED_FRAME_TAGS:
            return None
        return self.channels * ((self.bits_per_sample + 7) // 8)


def _is_chunk_id(tag: bytes) -> bool:
    return len(tag) == 4 and all(0x20 <= b <= 0x7E for b in tag)


def _trailing_junk(data: bytes, pos: int) -> int:
    """Bytes from ``pos`` to the end that are not RIFF chunks, a tag, or padding."""
    n = len(data)
    while pos + 8 <= n and _is_chunk_id(data[pos:pos + 4]):
        (size,) = struct.unpack_from("<I", data, pos + 4)
        pos += 8 + size + (size & 1)  # a chunk cut off by the end of the file is fine too
    rest = data[pos:] if pos < n else b""
    if (len(rest) < 8 or rest.count(0) == len(rest) or rest.startswith(b"ID3")
            or (len(rest) == _ID3V1_SIZE and rest.startswith(b"TAG"))):
        return 0
    return len(rest)


def parse_wav_header(data: bytes) -> WavHeader | None:
    """Read the header of a RIFF/WAVE file without decoding anything.

    A pure function of the bytes, O(number of chunks) and no allocation sized
    by a header field. Chunks before the data chunk are skipped by their
    declared sizes; the data chunk may be cut short (a truncated upload) or
    declare "until the end of the file".

    Args:
        data: the whole file.

    Returns:
        the header, or None when ``data`` is not a RIFF/WAVE file (other
        containers, RF64, Wave64 and big-endian RIFX are left to FFmpeg).

    Raises:
        AudioDecodeError: a RIFF/WAVE file whose header is cut off, has no
            ``fmt `` chunk before its ``data`` chunk, a ``fmt `` chunk shorter
            than 16 bytes, or no ``data`` chunk.
    """
    n = len(data)
    if n < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= n:
        tag = data[pos:pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if tag == b"fmt ":
            if size < 16:
                raise AudioDecodeError(
                    f"the WAV header is invalid: its 'fmt ' chunk is {size} bytes, less than 16"
                )
            if body + 16 > n:
                break
            fmt = list(struct.unpack_from("<HHIIHH", data, body))
            if fmt[0] == _WAVE_FORMAT_EXTENSIBLE and size >= 40 and body + 26 <= n:
                (fmt[0],) = struct.unpack_from("<H", data, body + 24)  # sub-format GUID's tag
        elif tag == b"data":
            if fmt is None:
                raise AudioDecodeError(
                    "the WAV header is invalid: the audio data comes before the "
                    "'fmt ' chunk that describes it"
                )
            declared = None if size in _DATA_SIZE_UNKNOWN else size
            present = n - body if declared is None else min(declared, n - body)
            junk = 0
            if declared is not None and body + declared < n:
                junk = _trailing_junk(data, body + declared + (declared & 1))
            tag_, channels, rate, byte_rate, block_align, bits = fmt
            return WavHeader(tag_, channels, rate, byte_rate, block_align, bits,
                             body, declared, present, junk)
        pos = body + size + (size & 1)
    if fmt is None:
        raise AudioDecodeError("the WAV header is cut off or invalid: it has no 'fmt ' chunk")
    raise AudioDecodeError("the WAV file holds no audio: it has no 'data' chunk")


def _check_wav_header(h: WavHeader, max_seconds: float) -> None:
    """Refuse a WAV header that cannot describe speech or contradicts the file.

    Raises:
        AudioDecodeError: 0 or more than ``MAX_CHANNELS`` channels, a rate
            outside ``MIN_SAMPLE_RATE``-``MAX_SAMPLE_RATE``, a block align that
            is not channels x bytes per sample (PCM, float, A/mu-law), a data
            chunk declared longer than ``max_seconds`` in a file holding less
            (the header is wrong or the upload incomplete), or a data chunk
            followed by more data than it declares.
        AudioTooLong: the file holds more than ``max_seconds`` of audio.
    """
    _check_channels(h.channels, "the WAV header declares")
    _check_rate(h.sample_rate, "the WAV header declares")
    frame_bytes = h.frame_bytes
    if frame_bytes is not None:
        if not 1 <= h.bits_per_sample <= 64:
            raise AudioDecodeError(
                f"the WAV header is invalid: {h.bits_per_sample} bits per sample"
            )
        if h.block_align != frame_bytes:
            raise AudioDecodeError(
                f"the WAV header is inconsistent: its block align is {h.block_align} bytes, "
                f"but {h.channels} channel(s) of {h.bits_per_sample}-bit samples take "
                f"{frame_bytes} bytes; re-export the file"
            )
        bytes_per_s = h.sample_rate * frame_bytes
        present_s = h.data_present / bytes_per_s
        if present_s > max_seconds:
            raise _too_long(present_s, max_seconds, "holds")
        if h.data_declared is not None and h.data_declared / bytes_per_s > max_seconds:
            raise AudioDecodeError(
                f"the WAV header declares {h.data_declared / bytes_per_s:.1f} s of audio "
                f"({h.data_declared} bytes) but the file holds {present_s:.2f} s "
                f"({h.data_present} bytes): the upload is incomplete or the header is wrong"
            )
    if h.trailing_junk:
        raise AudioDecodeError(
            f"the WAV header declares {h.data_declared} bytes of audio data but "
            f"{h.trailing_junk} more bytes follow them: the header is wrong; re-export the file"
        )


def _check_stream(container, stream, max_seconds: float, wav: bool) -> None:
    """Refuse, before decoding, an audio stream whose declared format cannot be speech.

    A rate or channel count of 0 means "not declared" (checked on each frame).
    Durations are checked for containers that store them in a header (not
    for WAV, already checked, nor for bit-rate estimates).

    Raises:
        AudioDecodeError: rate or channels out of bounds.
        AudioTooLong: a declared duration over ``max_seconds``.
    """
    ctx = stream.codec_context
    if ctx.sample_rate:
        _check_rate(int(ctx.sample_rate), "the audio stream declares")
    if ctx.channels:
        _check_channels(int(ctx.channels), "the audio stream declares")
    if wav or not _HEADER_DURATION_FORMATS.intersection(container.format.name.split(",")):
        return
    declared = 0.0  # the audio stream's own duration; the container's (maybe a video's) else
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None and container.duration > 0:
        declared = container.duration / av.time_base
    if declared > max_seconds:
        raise _too_long(declared, max_seconds, "declares")


# --------------------------------------------------------------------------- decoding


def decode_audio(data: bytes, max_seconds: float = 300.0) -> np.ndarray:
    """Decode an audio file held in memory to mono 16 kHz float32 PCM.

    Any container/codec FFmpeg (through PyAV) can read is accepted: wav, mp3,
    ogg/vorbis, ogg/opus, flac, m4a/aac, webm, and video files that carry an
    audio track (the first audio stream is used). Channels are averaged to
    mono and the result is resampled to ``SAMPLE_RATE`` (16000 Hz): each
    stretch of constant input rate ``r`` holding ``n`` samples gives
    ``ceil(n * 16000 / r)`` samples.

    The upload is untrusted. Before decoding, its declared format is checked:
    a WAV header by :func:`parse_wav_header` (rate, channels, block align,
    declared and present data sizes), any container's audio stream for rate,
    channels and declared duration. While decoding, every frame's rate,
    channels and size are checked, and the audio decoded so far against
    ``max_seconds`` and against ``MAX_VALUES_PER_BYTE`` x ``len(data)``
    decoded values (at least ``MIN_VALUE_BUDGET``). Decoding is streamed
    through the resampler, so time and memory are O(len(data)) whatever the
    headers say: memory holds the upload, one decoded frame and the 16 kHz
    output.

    Args:
        data: the whole file (bytes, bytearray or memoryview).
        max_seconds: longest accepted duration in seconds of decoded audio.
            Decoding stops, with an error, as soon as this is exceeded.

    Returns:
        float32 array of shape (samples,) at 16000 Hz, values clipped to
        [-1, 1].

    Raises:
        AudioTooLong: the file declares, holds or decodes to more than
            ``max_seconds`` of audio (an AudioDecodeError; HTTP 413).
        AudioDecodeError: the data is empty, cannot be opened/decoded, has no
            audio stream, declares or decodes to a sample rate outside
            ``MIN_SAMPLE_RATE``-``MAX_SAMPLE_RATE`` Hz or to 0 or more than
            ``MAX_CHANNELS`` channels, has a WAV header that contradicts the
            file, decodes to more than its size can hold, changes its sample
            rate more than ``MAX_RATE_RUNS`` - 1 times, or decodes to zero
            samples (HTTP 400). If the stream breaks after some audio has been
            decoded (e.g. a truncated upload), the audio decoded so far is
            returned and a warning is logged.
        ValueError: ``max_seconds`` is not > 0.
    """
    if data is None or len(data) == 0:
        raise AudioDecodeError("no audio data: the upload is empty (0 bytes)")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    data = bytes(data)
    wav = parse_wav_header(data)
    if wav is not None:
        _check_wav_header(wav, max_seconds)

    max_frame = {"max_samples": str(MAX_FRAME_VALUES)}  # FFmpeg's cap on one frame's allocation
    try:
        container = av.open(io.BytesIO(data), mode="r", options=max_frame)
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise AudioDecodeError(
            "could not read the audio: not a recognised audio/video file "
            f"({_reason(exc)})"
        ) from exc

    budget = max(MIN_VALUE_BUDGET, MAX_VALUES_PER_BYTE * len(data))  # decoded values
    values = 0
    parts: list[np.ndarray] = []  # 16 kHz output of finished constant-rate runs
    run: _RunResampler | None = None
    n_runs = 0
    done_s = 0.0  # seconds in finished runs
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioDecodeError(
                "the file has no audio stream (streams found: " + ", ".join(kinds) + ")"
            )
        stream = container.streams.audio[0]
        _check_stream(container, stream, max_seconds, wav is not None)
        stream.codec_context.options = max_frame

        try:
            for frame in container.decode(stream):
                n = frame.samples
                if n == 0:
                    continue
                rate, channels = int(frame.sample_rate), len(frame.layout.channels)
                _check_rate(rate, "the audio stream decodes to")
                _check_channels(channels, "the audio stream decodes to")
                values += n * channels
                if n * channels > MAX_FRAME_VALUES or values > budget:
                    raise AudioDecodeError(
                        f"the file decodes to far more audio than its {len(data)} bytes can "
                        f"hold (over {MAX_VALUES_PER_BYTE} samples per byte): it is corrupt, "
                        "crafted, or nearly all digital silence; re-encode or trim it"
                    )
                if run is None or run.rate_in != rate:
                    if run is not None:
                        done_s += run.n_in / run.rate_in
                        parts.append(run.finish())
                    n_runs += 1
                    if n_runs > MAX_RATE_RUNS:
                        raise AudioDecodeError(
                            f"the sample rate changes more than {MAX_RATE_RUNS - 1} times "
                            "within the audio stream; re-export the file at one rate"
                        )
                    run = _RunResampler(rate, SAMPLE_RATE)
                if done_s + (run.n_in + n) / rate > max_seconds:
                    raise _too_long(done_s + (run.n_in + n) / rate, max_seconds)
                run.push(_frame_to_mono(frame))
        except AudioDecodeError:
            raise
        except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
            if run is None:
                raise AudioDecodeError(
                    f"could not decode the audio stream ({_reason(exc)})"
                ) from exc
            logger.warning(
                "audio stream broke off after %.2f s of audio (%s); using what was decoded",
                done_s + run.n_in / run.rate_in,
                _reason(exc),
            )

    if run is not None:
        parts.append(run.finish())
    out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if out.shape[0] == 0:
        raise AudioDecodeError("the audio stream decoded to zero samples")
    np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(out, -1.0, 1.0, out=out)
    return out
