"""Tests for audio.py: decoding user uploads to 16 kHz mono float32."""

from __future__ import annotations

import io
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import audio  # noqa: E402
from audio import SAMPLE_RATE, AudioDecodeError, decode_audio, resample  # noqa: E402

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def wav_bytes(pcm: np.ndarray, sr: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


def encode_with_pyav(pcm: np.ndarray, sr: int, fmt: str, codec: str) -> bytes:
    """Encode mono float32 pcm with PyAV's encoder into an in-memory container."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr, layout="mono")
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.format.name, layout="mono", rate=sr, frame_size=ctx.frame_size or 1024
        )
        src = av.AudioFrame.from_ndarray(pcm.astype(np.float32)[None, :], format="flt", layout="mono")
        src.sample_rate = sr
        src.pts = 0
        src.time_base = Fraction(1, sr)
        for frame in resampler.resample(src) + resampler.resample(None):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------- decode


def test_wav_48k_stereo_to_16k_mono_keeps_duration_and_pitch():
    sr, seconds, freq = 48000, 2.0, 440.0
    left = sine(freq, seconds, sr, 0.5)
    right = sine(freq, seconds, sr, 0.3)
    data = wav_bytes(np.stack([left, right], axis=1), sr)

    out = decode_audio(data)

    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) / SAMPLE_RATE - seconds) <= 0.01 * seconds
    assert abs(peak_hz(out, SAMPLE_RATE) - freq) < 2.0
    # channels are averaged: amplitude (0.5 + 0.3) / 2
    assert abs(np.max(np.abs(out[1000:-1000])) - 0.4) < 0.02
    assert np.max(np.abs(out)) <= 1.0


@pytest.mark.parametrize(
    "subtype,fmt",
    [("PCM_U8", "WAV"), ("PCM_16", "WAV"), ("PCM_24", "WAV"), ("PCM_32", "WAV"),
     ("FLOAT", "WAV"), ("DOUBLE", "WAV"), ("PCM_16", "FLAC")],
)
def test_sample_formats_scale_to_unit_range(subtype, fmt):
    sr = 22050
    x = sine(1000.0, 0.5, sr, 0.5)
    out = decode_audio(wav_bytes(x, sr, subtype=subtype, fmt=fmt))
    assert out.dtype == np.float32
    assert abs(len(out) - 8000) <= 1
    assert abs(np.max(np.abs(out[200:-200])) - 0.5) < 0.02
    assert abs(peak_hz(out, SAMPLE_RATE) - 1000.0) < 3.0


@pytest.mark.parametrize(
    "fmt,codec", [("mp3", "libmp3lame"), ("ogg", "libopus"), ("webm", "libopus"), ("ipod", "aac")]
)
def test_decode_pyav_encoded_lossy(fmt, codec):
    sr = 48000 if codec == "libopus" else 44100  # ipod = .m4a
    x = sine(660.0, 1.5, sr, 0.5)
    data = encode_with_pyav(x, sr, fmt, codec)
    assert len(data) > 1000

    out = decode_audio(data)

    assert out.dtype == np.float32 and out.ndim == 1
    # lossy codecs add encoder delay/padding: a few tens of ms at most
    assert abs(len(out) / SAMPLE_RATE - 1.5) < 0.08
    assert abs(peak_hz(out, SAMPLE_RATE) - 660.0) < 3.0
    assert 0.3 < np.max(np.abs(out)) <= 1.0


def test_real_speech_file_yongen():
    path = MEDIA / "yongen.wav"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    out = decode_audio(path.read_bytes())
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) / SAMPLE_RATE - 8.0) <= 0.08
    rms = float(np.sqrt(np.mean(out**2)))
    assert rms > 0.01 and np.max(np.abs(out)) <= 1.0


# --------------------------------------------------------------------------- errors


def test_empty_bytes_raise():
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"")


def test_garbage_bytes_raise():
    rng = np.random.default_rng(0)
    garbage = b"this is not audio " + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(AudioDecodeError, match="could not"):
        decode_audio(garbage)


def test_audio_decode_error_is_value_error():
    assert issubclass(AudioDecodeError, ValueError)


def test_video_only_file_raises():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            img = np.full((64, 64, 3), i * 40, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioDecodeError, match="no audio stream") as info:
        decode_audio(buf.getvalue())
    assert "video" in str(info.value)


def test_too_long_raises_and_stops_early(monkeypatch):
    sr = 8000
    data = wav_bytes(np.zeros(sr * 60, dtype=np.float32), sr)  # 60 s of silence
    calls = {"n": 0}
    real = audio._frame_to_mono

    def counting(frame):
        calls["n"] += 1
        return real(frame)

    monkeypatch.setattr(audio, "_frame_to_mono", counting)
    with pytest.raises(AudioDecodeError, match="too long"):
        decode_audio(data, max_seconds=2.0)
    decoded_frames = calls["n"]
    calls["n"] = 0
    assert len(decode_audio(data, max_seconds=61.0)) == SAMPLE_RATE * 60
    all_frames = calls["n"]
    assert decoded_frames < all_frames / 10, (decoded_frames, all_frames)


def test_zero_samples_raise():
    data = wav_bytes(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioDecodeError, match="zero samples|could not"):
        decode_audio(data)


# --------------------------------------------------------------------------- resample


def test_resample_lengths_and_dtype():
    x = sine(300.0, 1.0, 22050)
    y = resample(x, 22050, 16000)
    assert y.dtype == np.float32 and len(y) == 16000
    assert abs(peak_hz(y, 16000) - 300.0) < 2.0
    assert len(resample(np.zeros(48000), 48000)) == 16000
    same = resample(x.astype(np.float64), 22050, 22050)
    assert same.dtype == np.float32 and np.array_equal(same, x)
    assert resample(np.zeros(0, np.float32), 44100).shape == (0,)


def test_resample_rejects_bad_rates():
    with pytest.raises(ValueError):
        resample(np.zeros(10, np.float32), 0, 16000)
    with pytest.raises(ValueError):
        resample(np.zeros(10, np.float32), 16000, -1)
