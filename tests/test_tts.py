"""Tests for the TTS layer (tts.py and its backends): sentence splitting, voices,
streaming resampling, piper and espeak-ng, the OpenAI-compatible speech endpoint
(against tests/fake_openai.py) and edge-tts (against a fake of its service)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import audio  # noqa: E402
import tts  # noqa: E402
import tts_edge  # noqa: E402
import tts_openai  # noqa: E402
from conftest import wait_for  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402
from tts import TTS, EspeakTTS, PiperTTS, make_tts, split_sentences  # noqa: E402

SR = 16000


# --------------------------------------------------------------------------- split_sentences


def test_split_on_punctuation_keeps_it():
    text = "Hello world. How are you?  I'm fine!  Really; yes"
    assert split_sentences(text) == ["Hello world.", "How are you?", "I'm fine!", "Really;", "yes"]


def test_split_keeps_runs_and_closing_quotes_and_decimals():
    text = 'Wait... what?! He said "no." Pi is 3.14 and see example.com now.'
    assert split_sentences(text) == [
        "Wait...",
        "what?!",
        'He said "no."',
        "Pi is 3.14 and see example.com now.",
    ]


def test_split_cjk_and_newlines():
    assert split_sentences("你好。今天天气很好！你呢？好") == ["你好。", "今天天气很好！", "你呢？", "好"]
    assert split_sentences("first line\nsecond line.\n\n third") == ["first line", "second line.", "third"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", " . "])
def test_split_empty(text):
    out = split_sentences(text)
    assert all(s.strip() for s in out)
    if not text.strip():
        assert out == []


def test_split_long_sentence_at_commas_then_spaces():
    clause = "this clause has several words in it"
    text = ", ".join([clause] * 12) + "."
    out = split_sentences(text, max_chars=80)
    assert len(out) > 1
    assert all(0 < len(s) <= 80 for s in out)
    # split at commas: every piece but the last ends with a comma
    assert all(s.endswith(",") for s in out[:-1]) and out[-1].endswith(".")
    assert " ".join(out).replace(" ", "") == text.replace(" ", "")

    words = " ".join(["word"] * 100) + "."  # no commas at all
    out = split_sentences(words, max_chars=50)
    assert all(0 < len(s) <= 50 for s in out)
    assert " ".join(out) == words

    blob = "x" * 450  # no spaces: hard cut
    out = split_sentences(blob, max_chars=200)
    assert [len(s) for s in out] == [200, 200, 50]


def test_split_rejects_bad_max_chars():
    with pytest.raises(ValueError):
        split_sentences("hi.", max_chars=0)


# --------------------------------------------------------------------------- stream (engine-independent)


class Recorder(TTS):
    name = "recorder"

    def __init__(self, events):
        self.events = events

    def synthesize(self, sentence):
        self.events.append(("synth", sentence))
        return np.full(160, 0.1, dtype=np.float32)


def test_stream_is_lazy_one_array_per_sentence():
    events = []
    gen = Recorder(events).stream("One. Two? Three!")
    assert events == []  # nothing synthesised before the first request
    first = next(gen)
    assert events == [("synth", "One.")]  # first sentence ready before the others exist
    assert first.dtype == np.float32
    rest = list(gen)
    assert len(rest) == 2
    assert [e[1] for e in events] == ["One.", "Two?", "Three!"]


# --------------------------------------------------------------------------- real engines


def check_speech(audio: np.ndarray, lo: float = 0.5, hi: float = 3.0):
    assert isinstance(audio, np.ndarray)
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / SR
    assert lo <= seconds <= hi, seconds
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    assert rms > 0.02, rms
    # speech energy lives mostly below 4 kHz (a resampling bug would smear it)
    spec = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / SR)
    assert spec[freqs < 4000].sum() > 0.8 * spec.sum()


@pytest.fixture(scope="module")
def piper():
    try:
        return PiperTTS()
    except (ImportError, FileNotFoundError) as exc:  # voice/package not installed
        pytest.skip(f"piper unavailable: {exc}")


@pytest.fixture(scope="module")
def espeak():
    try:
        return EspeakTTS()
    except (ImportError, OSError) as exc:
        pytest.skip(f"espeak-ng unavailable: {exc}")


def test_piper_hello_world(piper):
    assert piper.name == "piper" and piper.sample_rate_out == SR
    assert piper.sample_rate_in == 22050
    check_speech(piper.synthesize("Hello world."))
    assert piper.synthesize("   ").shape == (0,)


def test_piper_voice_is_loaded_once(piper):
    other = PiperTTS()
    assert other._voice is piper._voice


def test_espeak_hello_world(espeak):
    assert espeak.name == "espeak" and espeak.sample_rate_out == SR
    check_speech(espeak.synthesize("Hello world."))
    assert espeak.synthesize("").shape == (0,)


def test_espeak_is_thread_safe(espeak):
    # short and long texts alternate, so audio leaking between concurrent calls
    # would show up as wrong lengths (espeak-ng varies lengths by ~1% run to run)
    texts = ["Hi.", "This is a much longer sentence with many more words in it."] * 3
    expected = [espeak.synthesize(t) for t in texts]
    results: dict[int, np.ndarray] = {}

    def work(i):
        results[i] = espeak.synthesize(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        assert abs(len(results[i]) - len(exp)) <= 0.05 * len(exp), (i, len(results[i]), len(exp))


def test_espeak_unknown_voice():
    with pytest.raises(ValueError, match="voice"):
        EspeakTTS(voice="no-such-voice-xyz")
    check_speech(EspeakTTS().synthesize("Still speaking."))  # engine still usable


@pytest.mark.parametrize("engine", ["piper", "espeak"])
def test_stream_real_engine_yields_first_sentence_first(engine, request):
    eng = request.getfixturevalue(engine)
    events = []
    real = eng.synthesize

    def spy(sentence):
        events.append(("synth", sentence))
        return real(sentence)

    eng.synthesize = spy  # instance attribute shadows the method
    try:
        chunks = []
        for pcm in eng.stream("Good morning. How are you today? See you later."):
            events.append(("yield", len(pcm)))
            chunks.append(pcm)
    finally:
        del eng.synthesize
    assert len(chunks) == 3
    assert [e[0] for e in events] == ["synth", "yield"] * 3
    for pcm in chunks:
        check_speech(pcm, lo=0.4, hi=4.0)


# --------------------------------------------------------------------------- make_tts


def test_make_tts_unknown_name():
    with pytest.raises(ValueError) as info:
        make_tts("nope")
    msg = str(info.value)
    assert "nope" in msg and all(c in msg for c in ("auto", "piper", "espeak"))


def test_make_tts_by_name(piper, espeak):
    assert isinstance(make_tts("espeak"), EspeakTTS)
    assert isinstance(make_tts("Piper"), PiperTTS)
    assert isinstance(make_tts("auto"), PiperTTS)


def test_make_tts_auto_falls_back_to_espeak(monkeypatch, caplog, espeak):
    def broken(self, *a, **k):
        raise FileNotFoundError("voice gone")

    monkeypatch.setattr(tts.PiperTTS, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="tts"):
        engine = make_tts("auto")
    assert isinstance(engine, EspeakTTS)
    assert "voice gone" in caplog.text


def test_make_tts_none_and_choices():
    assert make_tts("none") is None
    assert tts.TTS_CHOICES == ("auto", "piper", "espeak", "edge", "openai", "none")
    with pytest.raises(ValueError, match="--tts_url"):
        make_tts("openai")


def test_add_arguments_feed_make_tts(monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tts", default="auto", choices=tts.TTS_CHOICES)
    tts.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.tts_url, args.tts_model, args.tts_voice, args.tts_timeout) == (None, "tts-1", None, 10.0)
    monkeypatch.setenv("TTS_API_KEY", "sekrit")
    args = parser.parse_args(["--tts", "openai", "--tts_url", "http://127.0.0.1:1/v1", "--tts_model", "tts-1-hd",
                              "--tts_voice", "af_bella", "--tts_timeout", "2.5"])
    engine = make_tts(args.tts, **tts.options_from_args(args))
    assert isinstance(engine, tts.OpenAITTS)
    assert engine.url == "http://127.0.0.1:1/v1/audio/speech"
    assert (engine.model, engine.default_voice, engine.api_key, engine.timeout) == ("tts-1-hd", "af_bella", "sekrit", 2.5)
    assert [v["id"] for v in engine.voices()][:2] == ["af_bella", "alloy"]  # the configured voice is offered too


# --------------------------------------------------------------------------- streaming resampling


def sine(n: int, rate: int, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)


def odd_pieces(x: np.ndarray, sizes=(1, 7, 333, 1001, 4799)):
    i, k = 0, 0
    while i < len(x):
        yield x[i : i + sizes[k % len(sizes)]]
        i += sizes[k % len(sizes)]
        k += 1


@pytest.mark.parametrize("rate_in", [24000, 22050, 48000, 16000, 8000])
def test_resampled_stream_exact_count_and_chunk_invariance(rate_in):
    n = rate_in + 12345  # an odd count that no chunk size divides
    x = sine(n, rate_in, hz=300.0)
    conv = tts.ResampledStream(rate_in)
    pieces = [conv.process(p) for p in odd_pieces(x)] + [conv.finish()]
    y = np.concatenate(pieces)
    assert y.dtype == np.float32 and len(y) == -(-n * SR // rate_in)
    whole = audio.resample(x, rate_in, SR)  # the one-shot conversion of the whole signal
    assert len(whole) == len(y)
    np.testing.assert_allclose(y, whole, atol=1e-5)
    t = np.arange(len(y)) / SR
    ref = 0.5 * np.sin(2 * np.pi * 300.0 * t)
    mid = slice(100, len(y) - 100)  # away from the filter's edges
    assert np.max(np.abs(y[mid] - ref[mid])) < 2e-3


# --------------------------------------------------------------------------- voices


def test_piper_voices(piper):
    voices = piper.voices()
    assert voices[0] == {"id": "en_US-joe-medium", "name": "Joe (English, United States, medium)",
                         "language": "en-US", "gender": "male"}
    assert piper.default_voice == "en_US-joe-medium"
    assert piper.check_voice(None) == piper.check_voice("EN_us-joe-medium") == "en_US-joe-medium"
    check_speech(piper.synthesize("Hello world.", voice="en_US-joe-medium"))
    with pytest.raises(ValueError) as info:
        piper.synthesize("Hello.", voice="en_GB-nobody-low")
    assert "en_GB-nobody-low" in str(info.value) and "en_US-joe-medium" in str(info.value)


def test_piper_stream_chunks_are_the_sentence(piper, monkeypatch):
    model, rate = piper._models[piper.default_voice]
    raw = []  # what piper produced at 22050 Hz (its durations vary run to run)

    class Recording:
        def synthesize(self, *a, **k):
            for chunk in model.synthesize(*a, **k):
                raw.append(chunk.audio_float_array.copy())
                yield chunk

    monkeypatch.setitem(piper._models, piper.default_voice, (Recording(), rate))
    text = "Good morning. How are you today?"  # piper speaks it as two sentences
    pieces = list(piper.stream_chunks(text))
    assert len(raw) == 2 and len(pieces) >= 2 and all(p.dtype == np.float32 and p.size for p in pieces)
    y = np.concatenate(pieces)
    whole = np.concatenate(raw)
    assert len(y) == -(-len(whole) * SR // rate)
    np.testing.assert_allclose(y, np.clip(audio.resample(whole, rate, SR), -1, 1), atol=1e-5)
    check_speech(y, lo=1.0, hi=5.0)


def test_espeak_voices(espeak):
    voices = espeak.voices()
    ids = [v["id"] for v in voices]
    assert ids[0] == "en-us" and espeak.default_voice == "en-us"
    assert {"en-us", "en-us+f3", "en", "de", "fr"} <= set(ids)
    by_id = {v["id"]: v for v in voices}
    assert by_id["en-us"] == {"id": "en-us", "name": "English (America)", "language": "en-US", "gender": "male"}
    assert by_id["en-us+f3"]["gender"] == "female" and by_id["en"]["language"] == "en-GB"
    assert all(set(v) == {"id", "name", "language", "gender"} for v in voices)
    check_speech(espeak.synthesize("Hello world.", voice="en-us+f3"))
    female = EspeakTTS(voice="en-us+f3")
    assert female.default_voice == "en-us+f3" and female.voices()[0]["id"] == "en-us+f3"
    other = EspeakTTS(voice="af")  # any espeak-ng voice: offered as well
    assert other.voices()[0]["id"] == "af" and "en-us" in [v["id"] for v in other.voices()]


@pytest.mark.parametrize("call", ["synthesize", "stream_chunks", "sentences", "stream"])
def test_unknown_voice_is_a_value_error_naming_the_voices(espeak, call):
    with pytest.raises(ValueError) as info:
        getattr(espeak, call)("Hello there.", voice="klingon")  # raised at the call, before iterating
    msg = str(info.value)
    assert "klingon" in msg and "espeak" in msg and "en-us, en-us+f3" in msg
    assert "more (GET /voices)" in msg  # long lists are cut


def f0(x: np.ndarray, sr: int = SR) -> float:
    """Median pitch (Hz) of the loud 40 ms frames, by autocorrelation over 60-400 Hz."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    frames = [x[i : i + n] for i in range(0, len(x) - n, hop)]
    rms = np.array([np.sqrt(np.mean(f.astype(np.float64) ** 2)) for f in frames])
    lo, hi = sr // 400, sr // 60
    found = []
    for f, r in zip(frames, rms):
        if r < 0.3 * rms.max():
            continue
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[n - 1 :]
        found.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(found))


def test_espeak_voice_per_thread(espeak):
    # espeak-ng's voice is a global setting: threads switching voices at once must
    # each get their own (male ~100 Hz, female3 ~210 Hz)
    text = "The quick brown fox jumps over the lazy dog."
    assert f0(espeak.synthesize(text, voice="en-us")) < 150 < f0(espeak.synthesize(text, voice="en-us+f3"))
    plan = ["en-us", "en-us+f3", "en-us+m3", "en+f3"] * 2
    results: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    start = threading.Barrier(len(plan))

    def work(i):
        start.wait()
        for _ in range(3):
            results[i].append(f0(espeak.synthesize(text, voice=plan[i])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, voice in enumerate(plan):
        female = "+f" in voice
        assert all((f > 150) == female for f in results[i]), (voice, results[i])


# --------------------------------------------------------------------------- openai (/v1/audio/speech)


def test_s16_stream_cuts_anywhere():
    x = (np.arange(-500, 501) * 60).astype("<i2")
    data = x.tobytes()
    dec = tts_openai.S16Stream()
    got = np.concatenate([dec.feed(data[i : i + 7]) for i in range(0, len(data), 7)])
    assert dec.pending == 0
    np.testing.assert_array_equal(got, x.astype(np.float32) / 32768)


@pytest.fixture
def fake():
    with FakeOpenAI() as f:
        yield f


def test_openai_streams_exact_samples_across_odd_chunk_edges(fake, monkeypatch):
    n = 24000 + 12345  # 1.51 s at 24 kHz
    src = sine(n, tts_openai.SPEECH_RATE, hz=440.0)
    fake.speech = lambda text: src  # sent as s16le in 100 ms chunks
    monkeypatch.setenv("TTS_API_KEY", "k-123")
    engine = tts.OpenAITTS(fake.url, model="tts-1", read_bytes=1001)  # reads cut samples in half
    pieces = list(engine.stream_chunks("Hello there.", voice="nova"))
    assert len(pieces) > 10 and all(p.dtype == np.float32 and p.size for p in pieces)
    y = np.concatenate(pieces)
    assert len(y) == -(-n * SR // tts_openai.SPEECH_RATE)  # exactly ceil(n * 2 / 3)
    sent = (np.clip(src, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768  # what went over the wire
    np.testing.assert_allclose(y, audio.resample(sent, tts_openai.SPEECH_RATE, SR), atol=1e-5)
    ref = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(len(y)) / SR)
    assert np.max(np.abs(y[100:-100] - ref[100:-100])) < 3e-3  # continuous across every edge
    rec = fake.speeches[-1]
    assert rec.body == {"model": "tts-1", "input": "Hello there.", "voice": "nova", "response_format": "pcm"}
    assert rec.authorization == "Bearer k-123"
    assert len(engine.synthesize("Hello there.")) == len(y) and fake.speeches[-1].body["voice"] == "alloy"


def test_openai_audio_arrives_while_the_endpoint_is_still_sending(fake):
    fake.speech_chunk_delay = 0.1  # 100 ms chunks at real time
    engine = tts.OpenAITTS(fake.url)
    t0 = time.monotonic()
    times = [time.monotonic() - t0 for _ in engine.stream_chunks("one two three four")]  # 1 s of tone
    assert len(times) >= 8
    assert times[0] < 0.3 and times[-1] > 0.8  # the first piece long before the last


def test_openai_voices_and_validation(fake):
    engine = tts.OpenAITTS(fake.url)
    voices = engine.voices()
    assert [v["id"] for v in voices] == ["alloy", "echo", "fable", "onyx", "nova", "shimmer"]
    assert {v["id"]: v["gender"] for v in voices}["nova"] == "female"
    with pytest.raises(ValueError, match="available: alloy, echo"):
        engine.synthesize("hi", voice="bogus")
    assert fake.speeches == []  # refused before any request


def test_openai_http_error_is_a_tts_error(fake):
    fake.status = 401
    with pytest.raises(tts.TTSError) as info:
        tts.OpenAITTS(fake.url).synthesize("Hello.")
    err = info.value
    assert (err.kind, err.status, err.backend) == ("status", 401, "openai")
    assert str(err) == f"openai TTS at {fake.url}/audio/speech answered HTTP 401: fake error 401"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_unreachable_url():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(tts.TTSError) as info:
        tts.OpenAITTS(url, timeout=2.0).synthesize("Hello.")
    assert time.monotonic() - t0 < 2.0
    assert info.value.kind == "unreachable"
    assert str(info.value).startswith(f"openai TTS at {url}/audio/speech is unreachable: ")


def test_openai_silent_server_times_out():
    with socket.socket() as srv:  # accepts connections (the kernel's backlog) and never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
        t0 = time.monotonic()
        with pytest.raises(tts.TTSError, match="timed out: no answer within 0.5 s") as info:
            list(tts.OpenAITTS(url, timeout=0.5).stream_chunks("Hello."))
        assert 0.4 < time.monotonic() - t0 < 1.5
        assert info.value.kind == "timeout" and info.value.http_status == 504


def test_openai_stall_mid_stream_times_out(fake):
    fake.speech_chunk_delay = 5.0  # the first 100 ms come at once, then nothing for 5 s
    got = []
    t0 = time.monotonic()
    with pytest.raises(tts.TTSError, match="timed out: no audio for 0.5 s"):
        for piece in tts.OpenAITTS(fake.url, timeout=0.5).stream_chunks("one two three"):
            got.append(piece)
    assert time.monotonic() - t0 < 1.5
    assert sum(len(p) for p in got) > 0  # what came before the stall was handed on


def test_openai_total_timeout(fake):
    fake.speech_chunk_delay = 0.2
    with pytest.raises(tts.TTSError, match="took over 0.5 s"):
        list(tts.OpenAITTS(fake.url, timeout=1.0, total_timeout=0.5).stream_chunks("one two three four five"))


# --------------------------------------------------------------------------- edge-tts


def mp3_bytes(x: np.ndarray, rate: int, bare: bool = True) -> bytes:
    """x (float32 mono) as MP3 made by PyAV (libmp3lame, 48 kbit/s). bare: no ID3 tag
    and no Xing frame, as Edge's service streams it."""
    buf = io.BytesIO()
    options = {"write_xing": "0", "id3v2_version": "0"} if bare else {}
    with av.open(buf, "w", format="mp3", options=options) as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        stream.bit_rate = 48000
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


EDGE_RATE = 24000
EDGE_SINE = sine(EDGE_RATE, EDGE_RATE, hz=440.0)  # 1 s


@pytest.fixture(scope="module")
def edge_mp3() -> bytes:
    return mp3_bytes(EDGE_SINE, EDGE_RATE)


@pytest.mark.parametrize("bare", [True, False])
def test_mp3_stream_decodes_pieces_as_whole(bare):
    data = mp3_bytes(EDGE_SINE, EDGE_RATE, bare=bare)
    assert data[:3] == (b"ID3" if not bare else data[:3]) and (bare or data[:3] == b"ID3")
    whole = tts_edge.MP3Stream()
    ref = np.concatenate([whole.feed(data), whole.flush()])
    dec = tts_edge.MP3Stream()
    pieces = [dec.feed(data[i : i + 333]) for i in range(0, len(data), 333)] + [dec.flush()]
    got = np.concatenate(pieces)
    assert dec.sample_rate == EDGE_RATE and dec.frames_dropped == 0
    np.testing.assert_array_equal(got, ref)
    assert sum(p.size > 0 for p in pieces) > 10  # audio comes out as the bytes come in
    assert EDGE_RATE <= len(got) <= EDGE_RATE + 4 * 576 + 1152  # encoder delay and padding, a Xing frame
    assert abs(peak_hz(got, EDGE_RATE) - 440.0) < 2.0
    assert 0.4 < np.max(np.abs(got)) < 0.6


class FakeEdge:
    """Edge's read-aloud WebSocket (and voice list) on a loopback port, on its own loop.

    Answers each SSML request with ``mp3`` in binary audio messages of ``piece``
    bytes, ``delay`` s apart (``stall``: none, ever), between turn.start and turn.end.
    """

    def __init__(self, mp3: bytes, piece: int = 333, delay: float = 0.0, stall: bool = False) -> None:
        self.mp3, self.piece, self.delay, self.stall = mp3, piece, delay, stall
        self.ssml: list[str] = []
        self.closed_early: list[bool] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # speech.config
        self.ssml.append((await ws.receive()).data)
        closed = asyncio.ensure_future(ws.receive())  # the client's close frame
        head = "X-RequestId:fake\r\nContent-Type:application/json; charset=utf-8\r\nPath:{}\r\n\r\n{{}}"
        audio_head = b"X-RequestId:fake\r\nContent-Type:audio/mpeg\r\nPath:audio\r\n"
        try:
            await ws.send_str(head.format("turn.start"))
            if self.stall:
                await asyncio.wait([closed], timeout=3600)
            for i in range(0, len(self.mp3), self.piece):
                if closed.done():
                    break
                await ws.send_bytes(len(audio_head).to_bytes(2, "big") + audio_head + self.mp3[i : i + self.piece])
                if self.delay:
                    await asyncio.sleep(self.delay)
            else:
                await ws.send_str(head.format("turn.end"))
        except (asyncio.CancelledError, ConnectionError):  # the connection dropped (the handler is cancelled)
            self.closed_early.append(True)
            raise
        self.closed_early.append(closed.done())
        await asyncio.wait([closed], timeout=5)
        await ws.close()
        return ws

    async def _voices(self, request):
        return web.json_response([
            {"ShortName": "xx-XX-FakeNeural", "FriendlyName": "Fake", "Locale": "xx-XX", "Gender": "Female"},
            {"ShortName": "en-US-GuyNeural", "FriendlyName": "Guy", "Locale": "en-US", "Gender": "Male"},
        ])

    def __enter__(self) -> "FakeEdge":
        async def start():
            app = web.Application()
            app.router.add_get("/edge/v1", self._ws)
            app.router.add_get("/voices/list", self._voices)
            self.runner = web.AppRunner(app, handler_cancellation=True)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def edge_at(monkeypatch):
    """Point edge-tts at a FakeEdge: ``with edge_at(FakeEdge(...)) as fake``."""
    edge_tts = pytest.importorskip("edge_tts", reason="edge-tts is not installed")

    def point(fake: FakeEdge) -> FakeEdge:
        fake.__enter__()
        point.fakes.append(fake)
        monkeypatch.setattr(edge_tts.communicate, "WSS_URL", f"ws://127.0.0.1:{fake.port}/edge/v1?TrustedClientToken=x")
        monkeypatch.setattr(edge_tts.voices, "VOICE_LIST", f"http://127.0.0.1:{fake.port}/voices/list?trustedclienttoken=x")
        return fake

    point.fakes = []
    yield point
    for fake in point.fakes:
        fake.__exit__()


def test_edge_streams_decoded_mp3(edge_at, edge_mp3):
    fake = edge_at(FakeEdge(edge_mp3, piece=333, delay=0.002))
    engine = tts.EdgeTTS(voice="en-GB-SoniaNeural")
    pieces = list(engine.stream_chunks("Tea & biscuits.", voice="en-US-GuyNeural"))
    assert len(pieces) > 10 and all(p.dtype == np.float32 and p.size for p in pieces)
    y = np.concatenate(pieces)
    dec = tts_edge.MP3Stream()
    n24 = len(np.concatenate([dec.feed(edge_mp3), dec.flush()]))
    assert len(y) == -(-n24 * SR // EDGE_RATE)  # every decoded sample, converted once
    assert abs(peak_hz(y, SR) - 440.0) < 2.0 and 0.4 < np.max(np.abs(y)) < 0.6
    assert "(en-US, GuyNeural)'>" in fake.ssml[-1] and ">Tea &amp; biscuits.<" in fake.ssml[-1]
    assert len(engine.synthesize("Hello.")) == len(y) and "(en-GB, SoniaNeural)'>" in fake.ssml[-1]


def test_edge_stop_early_closes_the_stream(edge_at, edge_mp3):
    fake = edge_at(FakeEdge(edge_mp3, piece=333, delay=0.05))  # ~1 s of messages
    chunks = tts.EdgeTTS().stream_chunks("Hello.")
    next(chunks)
    chunks.close()  # the session was interrupted
    assert wait_for(lambda: fake.closed_early == [True], 3.0)


def test_edge_voices(edge_at, edge_mp3):
    engine = tts.EdgeTTS()
    ids = [v["id"] for v in engine.voices()]
    assert ids[0] == "en-US-EmmaMultilingualNeural" == engine.default_voice
    assert {"en-US-AriaNeural", "en-US-GuyNeural", "en-GB-SoniaNeural"} <= set(ids)
    assert all(v["language"].startswith("en-") and v["gender"] in ("female", "male") for v in engine.voices())
    with pytest.raises(ValueError, match="unknown edge voice 'nobody'"):
        engine.synthesize("Hi.", voice="nobody")
    with pytest.raises(ValueError, match="Invalid voice 'nobody'"):
        tts.EdgeTTS(voice="nobody")  # a default voice edge-tts cannot take
    edge_at(FakeEdge(edge_mp3))
    assert engine.refresh_voices(timeout=5.0)  # the service's list replaces the built-in one
    assert engine.voices() == [
        {"id": "en-US-EmmaMultilingualNeural", "name": "en-US-EmmaMultilingualNeural", "language": None, "gender": None},
        {"id": "xx-XX-FakeNeural", "name": "Fake", "language": "xx-XX", "gender": "female"},
        {"id": "en-US-GuyNeural", "name": "Guy", "language": "en-US", "gender": "male"},
    ]


def test_edge_unreachable(monkeypatch):
    edge_tts = pytest.importorskip("edge_tts", reason="edge-tts is not installed")
    port = free_port()  # nothing listens there
    monkeypatch.setattr(edge_tts.communicate, "WSS_URL", f"ws://127.0.0.1:{port}/edge/v1?TrustedClientToken=x")
    monkeypatch.setattr(edge_tts.voices, "VOICE_LIST", f"http://127.0.0.1:{port}/voices/list?x=1")
    t0 = time.monotonic()
    engine = make_tts("edge", timeout=2.0)  # the voice list is fetched when reachable: here it is not
    assert len(engine.voices()) == len(tts_edge.EDGE_VOICES)
    with pytest.raises(tts.TTSError) as info:
        engine.synthesize("Hello.")
    assert time.monotonic() - t0 < 2.0
    assert info.value.kind == "unreachable"
    assert str(info.value).startswith(f"edge TTS at ws://127.0.0.1:{port}/edge/v1 is unreachable: ")


def test_edge_stalled_service_times_out(edge_at, edge_mp3):
    edge_at(FakeEdge(edge_mp3, stall=True))
    t0 = time.monotonic()
    with pytest.raises(tts.TTSError, match="edge TTS at .* timed out") as info:
        tts.EdgeTTS(timeout=1.0).synthesize("Hello.")
    assert info.value.kind == "timeout"
    assert time.monotonic() - t0 < 3.0


def test_edge_real_service_unreachable_offline():
    # the real service: this machine has no internet, so it must fail fast and clearly
    pytest.importorskip("edge_tts", reason="edge-tts is not installed")
    try:
        socket.getaddrinfo("speech.platform.bing.com", 443)
    except OSError:
        pass
    else:
        pytest.skip("the Edge service's name resolves here: not an offline machine")
    t0 = time.monotonic()
    with pytest.raises(tts.TTSError, match=r"edge TTS at wss://speech\.platform\.bing\.com/\S+ (is unreachable|timed out)"):
        tts.EdgeTTS(timeout=3.0).synthesize("Hello.")
    assert time.monotonic() - t0 < 4.0


def test_piper_second_voice_from_a_path(piper, tmp_path):
    # a second .onnx voice (a link to the bundled files: the same model, loaded once)
    link = tmp_path / "en_GB-copy-medium.onnx"
    link.symlink_to(piper.model_path)
    (tmp_path / "en_GB-copy-medium.onnx.json").symlink_to(piper.config_path)
    two = make_tts("piper", voice=str(link))
    assert [v["id"] for v in two.voices()] == ["en_GB-copy-medium", "en_US-joe-medium"]
    assert two.default_voice == "en_GB-copy-medium" and two._voice is piper._voice
    check_speech(two.synthesize("Hello world.", voice="en_US-joe-medium"))
    with pytest.raises(ValueError, match="unknown piper voice 'en_US-nobody-low'; available: en_US-joe-medium"):
        PiperTTS(voice="en_US-nobody-low")
