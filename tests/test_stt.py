"""Speech-to-text backends (stt.py): pocketsphinx on real synthesised speech, the
OpenAI-compatible backend against a small fake endpoint written here, bounded
failures (unreachable, silent, slow endpoints) and the faster-whisper error."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import sys
import time
import wave

import numpy as np
import pytest
from aiohttp import web

import stt
from stt import STTError, make_stt, pcm_to_wav

SR = 16000
STOP_WORDS = {"the", "a", "an", "is", "are", "in", "on", "of", "to", "me", "about", "what", "like", "over"}


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z']+", text.lower()) if w not in STOP_WORDS]


@pytest.fixture(scope="module")
def piper():
    from tts import make_tts

    try:
        return make_tts("piper")
    except Exception as exc:  # the voice package missing: espeak is too robotic for pocketsphinx
        pytest.skip(f"piper voice unavailable ({exc})")


@pytest.fixture(scope="module")
def sphinx():
    return make_stt("pocketsphinx")


# --------------------------------------------------------------------------- pocketsphinx


@pytest.mark.parametrize(
    "sentence",
    [
        "The quick brown fox jumps over the lazy dog.",
        "What is the weather like in Paris today?",
        "Please tell me a story about a little cat.",
    ],
)
def test_pocketsphinx_transcribes_synthesised_speech(piper, sphinx, sentence):
    pcm = piper.synthesize(sentence)
    t0 = time.perf_counter()
    text = asyncio.run(sphinx.transcribe(pcm))
    elapsed = time.perf_counter() - t0
    want = content_words(sentence)
    got = set(content_words(text))
    hits = sum(w in got for w in want)
    print(f"pocketsphinx: {text!r} ({hits}/{len(want)} content words, {elapsed / (len(pcm) / SR):.2f} s per s)")
    assert hits >= 0.5 * len(want), f"{text!r} has {hits} of {want}"
    assert elapsed < 3.0 * len(pcm) / SR  # loose: ~0.2 s per s of speech measured here


def test_pocketsphinx_empty_and_silence(sphinx):
    assert asyncio.run(sphinx.transcribe(np.zeros(0, np.float32))) == ""
    assert isinstance(asyncio.run(sphinx.transcribe(np.zeros(SR, np.float32))), str)
    with pytest.raises(ValueError):
        asyncio.run(sphinx.transcribe(np.zeros((2, 100), np.float32)))


def test_pocketsphinx_concurrent_turns_share_the_pool(piper):
    engine = make_stt("pocketsphinx", decoders=2)
    pcm = piper.synthesize("Tell me about the weather today.")

    async def main():
        return await asyncio.gather(*(engine.transcribe(pcm) for _ in range(3)))

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and "weather" in texts[0]


def test_pocketsphinx_bad_model_is_an_stt_error():
    with pytest.raises(STTError, match="pocketsphinx could not load"):
        make_stt("pocketsphinx", hmm="/nonexistent/model")


# --------------------------------------------------------------------------- faster-whisper and the factory


def test_faster_whisper_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import raises ImportError
    with pytest.raises(STTError, match=r"pip install faster-whisper"):
        make_stt("faster-whisper", model="tiny.en")


def test_make_stt_unknown_lists_choices():
    with pytest.raises(ValueError, match="pocketsphinx, faster-whisper, openai"):
        make_stt("kaldi")


def test_pcm_to_wav_round_trip():
    pcm = (np.sin(np.arange(1600) / 5.0) * 0.5).astype(np.float32)
    with wave.open(io.BytesIO(pcm_to_wav(pcm)), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SR, 1600)
        back = np.frombuffer(w.readframes(1600), np.int16) / 32767.0
    assert np.max(np.abs(back - pcm)) < 1e-4


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


class FakeTranscriptions:
    """A tiny /v1/audio/transcriptions: records requests; behaviour set per test."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | text | 500 | 401 | badjson | slow
        self.release = asyncio.Event()  # ends a "slow" answer (set before shutting down)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload = form["file"]
        data = upload.file.read()
        with wave.open(io.BytesIO(data), "rb") as w:
            info = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
        self.requests.append(
            {
                "auth": request.headers.get("Authorization"),
                "model": form.get("model"),
                "language": form.get("language"),
                "response_format": form.get("response_format"),
                "filename": upload.filename,
                "content_type": upload.content_type,
                "wav": info,
            }
        )
        if self.mode == "slow":
            await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "500":
            return web.json_response({"error": {"message": "model exploded"}}, status=500)
        if self.mode == "401":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.mode == "badjson":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "text":
            return web.Response(text="hello from text\n", content_type="text/plain")
        return web.json_response({"text": f" heard {info[3]} samples "})


async def serve(handler: FakeTranscriptions):
    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", handler.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


def test_openai_backend_posts_wav_and_model(monkeypatch):
    monkeypatch.setenv("STT_API_KEY", "sk-test")
    fake = FakeTranscriptions()
    pcm = np.zeros(SR // 2, np.float32)

    async def main():
        runner, url = await serve(fake)
        try:
            engine = make_stt("openai", url=url, model="whisper-tiny", language="en")
            text = await engine.transcribe(pcm)
            fake.mode = "text"
            plain = await make_stt("openai", url=url + "/audio/transcriptions").transcribe(pcm)
            return text, plain
        finally:
            await runner.cleanup()

    text, plain = asyncio.run(main())
    assert text == "heard 8000 samples"
    assert plain == "hello from text"
    first = fake.requests[0]
    assert first["auth"] == "Bearer sk-test"
    assert (first["model"], first["language"], first["response_format"]) == ("whisper-tiny", "en", "json")
    assert (first["filename"], first["content_type"]) == ("turn.wav", "audio/wav")
    assert first["wav"] == (1, 2, SR, SR // 2)
    assert fake.requests[1]["model"] == stt.DEFAULT_OPENAI_MODEL


def test_openai_backend_without_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("STT_API_KEY", raising=False)
    fake = FakeTranscriptions()

    async def main():
        runner, url = await serve(fake)
        try:
            return await make_stt("openai", url=url).transcribe(np.zeros(1600, np.float32))
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == "heard 1600 samples"
    assert fake.requests[0]["auth"] is None


@pytest.mark.parametrize(
    "mode, pattern",
    [("500", r"HTTP 500: .*model exploded"), ("401", r"HTTP 401.*STT_API_KEY"), ("badjson", r"malformed JSON")],
)
def test_openai_backend_errors_are_stt_errors(mode, pattern):
    fake = FakeTranscriptions()
    fake.mode = mode

    async def main():
        runner, url = await serve(fake)
        try:
            await make_stt("openai", url=url, api_key="k").transcribe(np.zeros(1600, np.float32))
        finally:
            await runner.cleanup()

    with pytest.raises(STTError, match=pattern):
        asyncio.run(main())


def test_openai_backend_slow_endpoint_times_out():
    fake = FakeTranscriptions()
    fake.mode = "slow"

    async def main():
        runner, url = await serve(fake)
        try:
            t0 = time.monotonic()
            with pytest.raises(STTError, match="did not answer within 0.5 s"):
                await make_stt("openai", url=url, timeout_s=0.5).transcribe(np.zeros(1600, np.float32))
            return time.monotonic() - t0
        finally:
            fake.release.set()
            await runner.cleanup()

    assert asyncio.run(main()) < 2.0


def test_openai_backend_unreachable_url_fails_within_the_timeout():
    # A port nothing listens on (refused at once) ...
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    # ... and a listener that accepts connections but never answers.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    mute_port = mute.getsockname()[1]

    async def attempt(url):
        t0 = time.monotonic()
        with pytest.raises(STTError) as info:
            await asyncio.wait_for(
                make_stt("openai", url=url, timeout_s=0.5).transcribe(np.zeros(1600, np.float32)), 5.0
            )
        return time.monotonic() - t0, str(info.value)

    try:
        refused_s, refused_msg = asyncio.run(attempt(f"http://127.0.0.1:{closed_port}/v1"))
        mute_s, mute_msg = asyncio.run(attempt(f"http://127.0.0.1:{mute_port}/v1"))
    finally:
        mute.close()
    assert "unreachable" in refused_msg and f"127.0.0.1:{closed_port}" in refused_msg and refused_s < 2.0
    assert "did not answer within 0.5 s" in mute_msg and mute_s < 2.0


def test_openai_backend_rejects_a_bad_url():
    with pytest.raises(ValueError, match="http"):
        make_stt("openai", url="ftp://example.com/v1")
