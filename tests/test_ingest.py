"""The live-audio ingest: crc32 framing parser, start-message bounds, PCM decoding,
the streaming resampler and the per-socket state machine (no server needed)."""

import asyncio
import struct
import zlib

import numpy as np
import pytest

from audio import StreamResampler, pcm_to_mono
from ingest import (
    FRAME_OVERHEAD,
    FramingError,
    StreamIngest,
    build_frame,
    parse_frame,
    parse_start,
)

PAYLOAD = np.arange(-80, 80, dtype="<i2").tobytes()  # 10 ms of s16le at 16 kHz (160 samples)


# -- framing ------------------------------------------------------------------------------
def test_frame_round_trip():
    seq, payload = parse_frame(build_frame(7, PAYLOAD))
    assert seq == 7 and bytes(payload) == PAYLOAD
    assert parse_frame(build_frame(0, b""))[1].nbytes == 0  # an empty payload is well-formed


def test_frame_layout_is_little_endian_with_crc_of_payload():
    frame = build_frame(3, b"\x01\x02")
    assert frame[:4] == bytes.fromhex("78563412") and frame[4] == 0x01
    assert struct.unpack("<II", frame[5:13]) == (3, 2)
    assert struct.unpack("<I", frame[-4:])[0] == zlib.crc32(b"\x01\x02")


@pytest.mark.parametrize(
    "mangle, words, seq",
    [
        (lambda f: f[:FRAME_OVERHEAD - 1], "shorter than", None),
        (lambda f: b"", "shorter than", None),
        (lambda f: b"\x00" * 4 + f[4:], "bad magic", 5),
        (lambda f: f[:4] + b"\x02" + f[5:], "message type", 5),
        (lambda f: f[:9] + struct.pack("<I", len(PAYLOAD) + 2) + f[13:], "payload_length", 5),
        (lambda f: f[:9] + struct.pack("<I", len(PAYLOAD) - 2) + f[13:], "payload_length", 5),
        (lambda f: f[:-6] + f[-4:], "payload_length", 5),  # truncated payload
        (lambda f: f[:20] + bytes([f[20] ^ 0xFF]) + f[21:], "CRC mismatch", 5),  # corrupted payload
        (lambda f: f[:-1] + bytes([f[-1] ^ 0x01]), "CRC mismatch", 5),  # corrupted checksum
    ],
)
def test_every_malformed_frame_is_refused_with_its_seq(mangle, words, seq):
    with pytest.raises(FramingError, match=words) as e:
        parse_frame(mangle(build_frame(5, PAYLOAD)))
    assert e.value.seq == seq


# -- start message -------------------------------------------------------------------------
def test_start_defaults():
    f = parse_start({"type": "start"})
    assert (f.sample_rate, f.format, f.channels, f.framing, f.interrupt) == (16000, "s16le", 1, "raw", False)
    f = parse_start({"sample_rate": 48000, "format": "f32le", "channels": 2, "framing": "crc32", "interrupt": True})
    assert f.frame_bytes == 8 and f.max_payload == 2 * 48000 * 8


@pytest.mark.parametrize(
    "field, value",
    [
        ("sample_rate", 7999), ("sample_rate", 48001), ("sample_rate", 1_360_000_000), ("sample_rate", "16000"),
        ("sample_rate", True), ("sample_rate", 16000.5), ("format", "s24le"), ("format", None), ("channels", 0),
        ("channels", 3), ("channels", 9), ("framing", "crc16"), ("interrupt", "yes"),
    ],
)
def test_start_out_of_bounds_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        parse_start({"type": "start", field: value})


# -- PCM decoding ---------------------------------------------------------------------------
def test_pcm_to_mono_scales_and_downmixes():
    s16 = np.array([[16384, -16384], [32767, 32767]], "<i2").tobytes()
    np.testing.assert_allclose(pcm_to_mono(s16, "s16le", 2), [0.0, 32767 / 32768], atol=1e-6)
    f32 = np.array([0.5, np.nan, 3.0, -np.inf], "<f4").tobytes()
    np.testing.assert_allclose(pcm_to_mono(f32, "f32le", 1), [0.5, 0.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="whole number"):
        pcm_to_mono(b"\x00" * 6, "f32le", 1)
    with pytest.raises(ValueError, match="whole number"):
        pcm_to_mono(b"\x00" * 6, "s16le", 2)


# -- streaming resampler ------------------------------------------------------------------------
@pytest.mark.parametrize("rate, chunk_ms", [(24000, 10), (24000, 40), (48000, 20), (44100, 500), (8000, 10), (22050, 37)])
def test_stream_resampler_exact_count_and_continuity_across_chunk_edges(rate, chunk_ms):
    n = rate * 2  # 2 s of a 440 Hz sine
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
    r = StreamResampler(rate)
    step = max(1, rate * chunk_ms // 1000)
    y = np.concatenate([r.process(x[i : i + step]) for i in range(0, n, step)] + [r.flush()])
    assert len(y) == 32000  # exactly 2 s at 16 kHz: nothing lost or duplicated
    t = np.arange(len(y)) / 16000
    ref = 0.5 * np.sin(2 * np.pi * 440 * t)
    # Away from the stream's two ends the output is the sine itself, so no chunk edge
    # clicks: the largest error anywhere in the middle is tiny.
    mid = slice(800, len(y) - 800)
    assert np.max(np.abs(y[mid] - ref[mid])) < 0.01
    # and no jump between consecutive samples larger than the sine's own slope allows
    assert np.max(np.abs(np.diff(y[mid]))) < 0.5 * 2 * np.pi * 440 / 16000 * 1.05


def test_stream_resampler_at_16k_passes_through():
    r = StreamResampler(16000)
    x = np.random.default_rng(0).standard_normal(333).astype(np.float32)
    np.testing.assert_array_equal(r.process(x), x)
    assert len(r.flush()) == 0


def test_stream_resampler_refuses_bad_rates():
    for bad in (0, -16000, 16000.5):
        with pytest.raises(ValueError):
            StreamResampler(bad)


# -- the per-socket state machine ----------------------------------------------------------------
class FakeWorker:
    """Records what the ingest queues; utterances are interrupted on demand."""

    def __init__(self) -> None:
        from events import PlaybackTracker

        self.playback = PlaybackTracker(lambda e: None)
        self.pushed: list[tuple[int | None, int]] = []  # (utterance, samples)
        self.ended: list[int] = []
        self.interrupts = 0

    def open_utterance(self, kind, text=""):
        return self.playback.open(kind, text)

    def put_audio(self, pcm, end_of_utterance=True, block=False, utterance=None, text=None):
        self.pushed.append((utterance, len(pcm)))
        return True

    def end_utterance(self, utterance):
        self.ended.append(utterance)

    def interrupt(self):
        self.interrupts += 1
        self.playback.interrupt()


def run_ingest(messages):
    """Feed (kind, data) messages to a StreamIngest; returns (worker, errors)."""
    worker, errors = FakeWorker(), []

    async def go():
        ingest = StreamIngest(worker, errors.append)
        for kind, data in messages:
            await (ingest.on_text(data) if kind == "text" else ingest.on_binary(data))
        await ingest.close_utterance()

    asyncio.run(go())
    return worker, errors


START_CRC = ("text", '{"type": "start", "framing": "crc32"}')


def test_crc_stream_plays_every_message_and_ends():
    msgs = [START_CRC] + [("bin", build_frame(i, PAYLOAD)) for i in range(5)] + [("text", '{"type": "end"}')]
    worker, errors = run_ingest(msgs)
    assert errors == []
    assert sum(n for _, n in worker.pushed) == 5 * 160 and worker.ended == [1]


def test_bad_crc_drops_only_that_message_with_one_error_naming_its_seq():
    bad = bytearray(build_frame(2, PAYLOAD))
    bad[20] ^= 0xFF
    msgs = [START_CRC] + [("bin", build_frame(i, PAYLOAD)) for i in range(2)] + [("bin", bytes(bad))]
    msgs += [("bin", build_frame(i, PAYLOAD)) for i in range(3, 6)]
    worker, errors = run_ingest(msgs)
    assert len(errors) == 1 and errors[0]["type"] == "error" and errors[0]["seq"] == 2 and "CRC" in errors[0]["msg"]
    assert sum(n for _, n in worker.pushed) == 5 * 160  # 6 sent, the corrupted one dropped


def test_seq_gap_is_reported_once_and_the_revealing_message_kept():
    msgs = [START_CRC] + [("bin", build_frame(i, PAYLOAD)) for i in (0, 1, 3, 4)]
    worker, errors = run_ingest(msgs)
    assert len(errors) == 1 and errors[0]["seq"] == 3 and "gap" in errors[0]["msg"]
    assert sum(n for _, n in worker.pushed) == 4 * 160


def test_repeated_seq_is_dropped_not_played_twice():
    msgs = [START_CRC] + [("bin", build_frame(i, PAYLOAD)) for i in (0, 1, 1, 2)]
    worker, errors = run_ingest(msgs)
    assert [e["seq"] for e in errors] == [1]
    assert sum(n for _, n in worker.pushed) == 3 * 160


def test_seq_restarts_at_each_start():
    msgs = [START_CRC, ("bin", build_frame(0, PAYLOAD)), START_CRC, ("bin", build_frame(0, PAYLOAD))]
    worker, errors = run_ingest(msgs)
    assert errors == [] and worker.ended == [1, 2]  # the second start closed the first utterance
    assert [u for u, _ in worker.pushed] == [1, 2]


def test_control_errors_are_answered_and_the_stream_goes_on():
    msgs = [
        ("bin", PAYLOAD),  # audio before start
        ("text", "not json"),
        ("text", "[1, 2]"),
        ("text", '{"type": "dance"}'),
        ("text", '{"type": "end"}'),  # end without start
        ("text", '{"type": "start", "sample_rate": 1360000000}'),
        ("text", "x" * 10000),
        ("text", "[" * 100000 + "]" * 100000),  # nested beyond the parser's recursion limit
        ("text", '{"type": "start", "format": "f32le"}'),
        ("bin", b"\x00" * 6),  # not a whole number of f32 samples
        ("bin", np.zeros(320, "<f4").tobytes()),
        ("bin", np.zeros(16000 * 3, "<f4").tobytes()),  # 3 s in one message: over the 2 s bound
    ]
    worker, errors = run_ingest(msgs)
    assert len(errors) == 10, errors
    assert all(e["type"] == "error" and e["msg"] for e in errors)
    assert worker.pushed == [(1, 320)] and worker.ended == [1]  # only the 20 ms of valid f32le


def test_interrupt_message_and_start_with_interrupt():
    msgs = [
        ("text", '{"type": "start"}'),
        ("bin", PAYLOAD),
        ("text", '{"type": "interrupt"}'),
        ("bin", PAYLOAD),  # no open utterance any more: refused, and said so
        ("text", '{"type": "start", "interrupt": true}'),
        ("bin", PAYLOAD),
    ]
    worker, errors = run_ingest(msgs)
    assert worker.interrupts == 2
    assert len(errors) == 1 and "start" in errors[0]["msg"]
    assert worker.pushed == [(1, 160), (2, 160)] and worker.ended == [2]


def test_audio_of_an_utterance_interrupted_elsewhere_is_dropped_and_said_once():
    worker, errors = FakeWorker(), []

    async def go():
        ingest = StreamIngest(worker, errors.append)
        await ingest.on_text('{"type": "start"}')
        await ingest.on_binary(PAYLOAD)
        worker.interrupt()  # e.g. POST /interrupt_talk
        for _ in range(3):
            await ingest.on_binary(PAYLOAD)

    asyncio.run(go())
    assert len(worker.pushed) == 1
    assert len(errors) == 1 and "interrupted" in errors[0]["msg"]
