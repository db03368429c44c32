"""Tests for tts.py: sentence splitting and the offline TTS engines."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tts  # noqa: E402
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
        for audio in eng.stream("Good morning. How are you today? See you later."):
            events.append(("yield", len(audio)))
            chunks.append(audio)
    finally:
        del eng.synthesize
    assert len(chunks) == 3
    assert [e[0] for e in events] == ["synth", "yield"] * 3
    for audio in chunks:
        check_speech(audio, lo=0.4, hi=4.0)


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
