"""Generators of hostile (and matching benign) audio files for decoder tests.

Each function returns the whole file as ``bytes``, built by hand with ``struct`` so
that any header field can hold any value, including ones no encoder would write
(a 1.36 GHz sample rate, 0 or 9 channels, a data chunk that claims 4 GB).
Nothing here decodes; the files are small (a few KB) whatever their headers say.
"""

from __future__ import annotations

import struct

import numpy as np

# WAVE format tags (mmreg.h)
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

# The last 14 bytes of every KSDATAFORMAT_SUBTYPE_* GUID (the first 2 hold the format tag).
_KSDATAFORMAT_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")

# The data size that streaming writers put in a header they cannot rewrite: "until EOF".
SIZE_UNKNOWN = 0xFFFFFFFF


def pcm16(frames: int, channels: int = 1, freq_hz: float = 440.0, rate: int = 16000,
          amp: float = 0.5) -> bytes:
    """``frames`` sample frames of a sine, 16-bit little-endian, ``channels`` interleaved."""
    t = np.arange(frames) / float(rate)
    x = np.round(amp * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype("<i2")
    return np.repeat(x[:, None], max(channels, 1), axis=1).tobytes() if channels else b""


def wav(payload: bytes, rate: int, channels: int = 1, bits: int = 16, *,
        tag: int = WAVE_FORMAT_PCM, block_align: int | None = None,
        byte_rate: int | None = None, data_size: int | None = None,
        riff_size: int | None = None, after_data: bytes = b"",
        before_data: bytes = b"", subformat: int | None = None) -> bytes:
    """A RIFF/WAVE file around ``payload`` with every header field overridable.

    Args:
        payload: the bytes of the data chunk, written as they are.
        rate: ``nSamplesPerSec`` (Hz), written modulo 2**32.
        channels: ``nChannels``, written modulo 2**16.
        bits: ``wBitsPerSample``.
        tag: ``wFormatTag``.
        block_align: ``nBlockAlign``; default ``channels * ceil(bits / 8)``.
        byte_rate: ``nAvgBytesPerSec``; default ``rate * block_align`` (mod 2**32).
        data_size: the data chunk's declared size; default ``len(payload)``.
        riff_size: the RIFF chunk's declared size; default the true one.
        after_data: bytes appended after the data chunk (other chunks, junk).
        before_data: bytes inserted between the fmt and data chunks.
        subformat: with ``tag=WAVE_FORMAT_EXTENSIBLE``, the tag in the sub-format GUID
            (a 40-byte fmt chunk: valid bits = ``bits``, channel mask 0).
    """
    if block_align is None:
        block_align = channels * ((bits + 7) // 8)
    if byte_rate is None:
        byte_rate = rate * block_align
    fmt = struct.pack("<HHIIHH", tag, channels & 0xFFFF, rate & 0xFFFFFFFF,
                      byte_rate & 0xFFFFFFFF, block_align & 0xFFFF, bits)
    if subformat is not None:  # cbSize, wValidBitsPerSample, dwChannelMask, SubFormat GUID
        fmt += struct.pack("<HHIH", 22, bits, 0, subformat) + _KSDATAFORMAT_GUID_TAIL
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
            + b"data" + struct.pack("<I", len(payload) if data_size is None else data_size)
            + payload + after_data)
    size = len(body) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", size & 0xFFFFFFFF) + body


def chunk(tag: bytes, content: bytes) -> bytes:
    """One RIFF chunk (``tag`` of 4 bytes, size, content, pad byte to an even length)."""
    return tag + struct.pack("<I", len(content)) + content + (b"\x00" if len(content) % 2 else b"")


def wav_at_rate(rate: int, frames: int = 640, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of ``frames`` sample frames whose header says ``rate`` Hz."""
    return wav(pcm16(frames, channels), rate, channels)


def wav_with_channels(channels: int, frames: int = 320, rate: int = 16000) -> bytes:
    """A 16-bit PCM WAV whose header says ``channels`` channels (0 gives an empty payload
    with a block align of 0)."""
    return wav(pcm16(frames, channels), rate, channels)


def wav_claiming_size(data_size: int, frames: int = 320, rate: int = 16000) -> bytes:
    """A 16 kHz mono WAV holding ``frames`` frames whose data chunk declares ``data_size`` bytes."""
    return wav(pcm16(frames), rate, data_size=data_size)


def wav_truncated(seconds_declared: float, seconds_present: float, rate: int = 16000) -> bytes:
    """A WAV whose header declares ``seconds_declared`` of 16-bit mono audio, cut after
    ``seconds_present`` (an upload that broke off)."""
    whole = pcm16(int(round(seconds_declared * rate)), rate=rate)
    return wav(whole[: 2 * int(round(seconds_present * rate))], rate, data_size=len(whole))


def wav_overlong_data(seconds_declared: float, seconds_present: float, rate: int = 16000) -> bytes:
    """A WAV whose data chunk runs on past its declared size: ``seconds_present`` of audio
    in the file, ``seconds_declared`` in the header."""
    payload = pcm16(int(round(seconds_present * rate)), rate=rate)
    return wav(payload, rate, data_size=2 * int(round(seconds_declared * rate)))


def au(payload: bytes, rate: int, channels: int = 1, encoding: int = 3,
       data_size: int | None = None) -> bytes:
    """A Sun/NeXT ``.au`` file (big-endian; encoding 3 = 16-bit linear PCM) around ``payload``,
    whose header may declare any rate: a container other than WAV for the generic checks."""
    size = len(payload) if data_size is None else data_size
    return struct.pack(">4sIIIII", b".snd", 24, size & 0xFFFFFFFF, encoding,
                       rate & 0xFFFFFFFF, channels) + payload


def au_at_rate(rate: int, frames: int = 640, channels: int = 1) -> bytes:
    """A 16-bit PCM ``.au`` file of ``frames`` sample frames whose header says ``rate`` Hz."""
    x = np.frombuffer(pcm16(frames, channels), "<i2").astype(">i2").tobytes()
    return au(x, rate, channels)


def flac_with_streaminfo(flac: bytes, *, rate: int | None = None,
                         total_samples: int | None = None) -> bytes:
    """``flac`` (a FLAC file whose first metadata block is STREAMINFO, as every encoder
    writes it) with its declared sample rate (20 bits, Hz) or total sample count (36 bits)
    replaced; the frames are left as they are."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0, "STREAMINFO must come first"
    out = bytearray(flac)
    info = 8  # "fLaC" + the metadata block header
    bits = int.from_bytes(out[info + 10:info + 18], "big")  # rate 20, ch-1 3, bps-1 5, total 36
    if rate is not None:
        bits = (bits & ~(0xFFFFF << 44)) | ((rate & 0xFFFFF) << 44)
    if total_samples is not None:
        bits = (bits & ~((1 << 36) - 1)) | (total_samples & ((1 << 36) - 1))
    out[info + 10:info + 18] = bits.to_bytes(8, "big")
    return bytes(out)
