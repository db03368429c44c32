"""The web page in headless Chromium: the microphone, both ways, moves the avatar's mouth.

Chromium's fake capture device plays a speech WAV as the microphone
(``--use-file-for-fake-audio-capture``, looped). For each mic mode the test opens the
page, picks the mode, presses Start, samples the <video> into a canvas around the
mouth while the mic is off (the default avatar idles on a still portrait), switches
the mic on and samples again: the mouth must move clearly with the mic and stay
nearly still before, the page's event log must show the server's
``playback_started``, and switching the mic off must finish every utterance.
Screenshots go to /tmp/browser-<mode>.png. Also here: the page's CRC-32 and framing
against zlib, the AudioWorklet's 20 ms chunks, the socket protocol against a stub,
the older controls (Say it, Interrupt, upload) and a server with ``--api_key``.
About 40 s in all on 2 cores.

Needs Debian's chromium and the playwright package (never a downloaded browser);
the tests skip without them.
"""

from __future__ import annotations

import base64
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_MEDIA

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
HOW_TO_GET = "apt-get install chromium; pip install playwright (never let playwright download a browser)"
# Flags for a headless run on a closed machine (docs: machine notes, Chromium); the
# last one lets WebRTC offer loopback candidates.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
]
SPEECH_WAVS = ("yongen.wav", "sun.wav")  # ../shared/media, when present
SCREENSHOT_DIR = Path("/tmp")

SAMPLE_EVERY_MS = 100
IDLE_MS = 1500          # sampled with the mic off
MIC_MS = 4000           # sampled with the mic on
SETTLE_MS = 1500        # after the first frame: the video encoder's quality ramps up for ~1 s
# Motion = mean |difference| in the mouth box, grey levels, on BLUR x BLUR pixel averages
# (a mouth opening is a large dark shape; codec artefacts are fine-grained). Measured
# here: a talking mouth 30-40 from the idle frame (90th percentile over 4 s); a still
# one 0-0.1 between consecutive samples, but a quality jump of the video encoder (a
# blurrier keyframe when its bitrate drops, now and then on a busy machine) 2.6.
BLUR = 4
MOVING = 12.0
STILL = 6.0

# Samples the <video> every `every` ms for `ms` ms; returns the grey mouth box of each sample (base64).
SAMPLE_JS = """async ({box, ms, every}) => {
  const v = document.getElementById('video');
  const [x1, y1, x2, y2] = box, w = x2 - x1, h = y2 - y1;
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const g = c.getContext('2d', {willReadFrequently: true});
  const out = [];
  for (const end = performance.now() + ms; performance.now() < end;) {
    g.drawImage(v, x1, y1, w, h, 0, 0, w, h);
    const d = g.getImageData(0, 0, w, h).data;
    let s = '';
    for (let i = 0; i < d.length; i += 4) s += String.fromCharCode((0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) | 0);
    out.push(btoa(s));
    await new Promise(r => setTimeout(r, every));
  }
  return out;
}"""
FRAME_JS = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext('2d').drawImage(v, 0, 0);
  return c.toDataURL('image/png');
}"""


def _require_browser():
    """Skips without chromium or playwright; fails instead under REQUIRE_BROWSER_TESTS=1 (CI)."""
    missing = _missing()
    if missing:
        if os.environ.get("REQUIRE_BROWSER_TESTS") == "1":
            pytest.fail(f"{missing} (REQUIRE_BROWSER_TESTS=1): {HOW_TO_GET}")
        pytest.skip(f"{missing}: {HOW_TO_GET}")


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed"
    return None


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    """A 16-bit PCM speech WAV for Chromium's fake microphone."""
    for name in SPEECH_WAVS:
        if (SHARED_MEDIA / name).exists():
            return SHARED_MEDIA / name
    import soundfile as sf

    from tts import make_tts

    tts = make_tts("espeak")
    text = "Hello there. I am speaking into the microphone, and the avatar moves its lips with my voice."
    pcm = np.concatenate([a for _, a in tts.sentences(text)])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, pcm, tts.sample_rate_out, subtype="PCM_16")  # Chromium's fake capture reads 16-bit PCM
    return path


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    _require_browser()
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--model", "default")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chromium(speech_wav):
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={speech_wav}"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, browser_server):
    context = chromium.new_context()
    pg = context.new_page()
    pg.goto(browser_server.url)
    yield pg
    pg.evaluate("stop()")  # the server closes the session now (a killed page's lingers until ICE times out)
    context.close()


def test_crc32_and_framing_match_the_server_format(page):
    """The page's CRC-32 is zlib's, and a framed message has the documented layout."""
    rng = np.random.default_rng(7)
    for n in (0, 1, 13, 960 * 4):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        got = page.evaluate("(b) => AvatarFraming.crc32(Uint8Array.from(b))", list(data))
        assert got == zlib.crc32(data), n
    samples = [0.0, 0.5, -0.25, 1.0, -1.0, 1.5]
    msg = bytes(page.evaluate(
        """(s) => Array.from(new Uint8Array(AvatarFraming.audioMessage(7, AvatarFraming.pcmBytes(Float32Array.from(s), 'f32le'))))""",
        samples))
    payload = np.clip(np.asarray(samples, "<f4"), -1, 1).tobytes()
    assert msg[:4] == (0x12345678).to_bytes(4, "little")
    assert msg[4] == 0x01
    assert int.from_bytes(msg[5:9], "little") == 7
    assert int.from_bytes(msg[9:13], "little") == len(payload)
    assert msg[13:-4] == payload
    assert int.from_bytes(msg[-4:], "little") == zlib.crc32(payload)
    s16 = bytes(page.evaluate("(s) => Array.from(AvatarFraming.pcmBytes(Float32Array.from(s), 's16le'))", samples))
    assert np.frombuffer(s16, "<i2").tolist() == [0, 16384, -8192, 32767, -32768, 32767]


def test_worklet_cuts_the_mic_into_20ms_chunks(page):
    """The AudioWorklet delivers the fake microphone (speech) in 20 ms mono chunks."""
    got = page.evaluate("""async () => {
      const stream = await navigator.mediaDevices.getUserMedia({audio: true});
      const ctx = new AudioContext();
      await ctx.audioWorklet.addModule('/web/mic-worklet.js');
      const node = new AudioWorkletNode(ctx, 'mic-chunker', {processorOptions: {chunkMs: 20}});
      const sizes = [], rms = [];
      node.port.onmessage = (ev) => { sizes.push(ev.data.length);
        rms.push(Math.sqrt(ev.data.reduce((a, x) => a + x * x, 0) / ev.data.length)); };
      ctx.createMediaStreamSource(stream).connect(node); node.connect(ctx.destination);
      await ctx.resume();
      await new Promise(r => setTimeout(r, 1500));
      const rate = ctx.sampleRate; await ctx.close(); stream.getTracks().forEach(t => t.stop());
      return {rate, sizes, rms};
    }""")
    assert got["sizes"], "the worklet posted no chunks"
    assert set(got["sizes"]) == {round(got["rate"] * 0.020)}
    assert 40 <= len(got["sizes"]) <= 90  # ~75 in 1.5 s (the first ones start after the graph does)
    assert max(got["rms"]) > 0.01, "the fake microphone is silent"


class _IngestStub:
    """Serves the page and records what it sends to ``/ws`` (aiohttp in a thread)."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from aiohttp import WSMsgType, web

        from client import free_port

        self.messages: list[str | bytes] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        web_dir = Path(__file__).resolve().parents[1] / "web"

        async def ws(request):
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                self.messages.append(msg.data if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) else str(msg.type))
            return sock

        async def index(request):
            return web.FileResponse(web_dir / "index.html")

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/ws", ws)
        app.router.add_static("/web/", web_dir)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def serve() -> None:  # its own loop: playwright's sync API owns the main thread's
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_websocket_mic_sends_crc_framed_20ms_pcm(chromium):
    """The page's WebSocket mic: one start, 20 ms f32le messages with seq 0, 1, ... and valid CRCs, one end."""
    import json

    stub = _IngestStub()
    context = chromium.new_context()
    try:
        pg = context.new_page()
        pg.goto(stub.url)
        # No WebRTC session here: give the page a session id and the mode, then switch the mic.
        pg.evaluate("""async () => {
          sessionid = 'stub'; pc = {}; mic.mode = 'websocket'; openSocket();
          await setMic(true); await new Promise(r => setTimeout(r, 1000)); await setMic(false);
        }""")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (stub.messages and isinstance(stub.messages[-1], str)
                                                  and json.loads(stub.messages[-1])["type"] == "end"):
            time.sleep(0.05)
    finally:
        context.close()
        stub.stop()
    msgs = stub.messages
    start, end, frames = json.loads(msgs[0]), json.loads(msgs[-1]), msgs[1:-1]
    assert start["type"] == "start" and start["format"] == "f32le" and start["framing"] == "crc32"
    assert start["channels"] == 1 and start["sample_rate"] in (44100, 48000)
    assert end == {"type": "end"}
    assert 30 <= len(frames) <= 60, len(frames)  # 1 s in 20 ms messages
    chunk = round(start["sample_rate"] * 0.020)
    for seq, m in enumerate(frames):
        assert isinstance(m, bytes)
        assert int.from_bytes(m[:4], "little") == 0x12345678 and m[4] == 0x01
        assert int.from_bytes(m[5:9], "little") == seq
        n = int.from_bytes(m[9:13], "little")
        assert n == 4 * chunk and len(m) == 13 + n + 4
        assert int.from_bytes(m[-4:], "little") == zlib.crc32(m[13:-4])
    pcm = np.frombuffer(b"".join(m[13:-4] for m in frames), "<f4")
    assert np.abs(pcm).max() <= 1.0 and np.sqrt(np.mean(pcm**2)) > 0.003, "the mic sent silence"


# -- the mouth, with each microphone mode --------------------------------------------------
def _connect(page, mode: str):
    page.check(f'input[name="micmode"][value="{mode}"]')
    page.click("#start")
    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20000)
    page.wait_for_timeout(SETTLE_MS)


def _mouth_box(page) -> tuple[int, int, int, int]:
    import cv2

    from client import mouth_box

    png = base64.b64decode(page.evaluate(FRAME_JS).split(",", 1)[1])
    frame = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return mouth_box(frame, scale=1.0)


def _sample(page, box, ms) -> np.ndarray:
    """Grey mouth-box samples, averaged over BLUR x BLUR pixels (float32)."""
    import cv2

    x1, y1, x2, y2 = box
    crops = page.evaluate(SAMPLE_JS, {"box": list(box), "ms": ms, "every": SAMPLE_EVERY_MS})
    grey = [np.frombuffer(base64.b64decode(c), np.uint8).reshape(y2 - y1, x2 - x1).astype(np.float32) for c in crops]
    return np.stack([cv2.resize(g, None, fx=1 / BLUR, fy=1 / BLUR, interpolation=cv2.INTER_AREA) for g in grey])


def _motion(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean |difference| (grey levels) of each frame's mouth box from ``reference``."""
    return np.abs(frames - reference).mean(axis=(1, 2))


def _jitter(frames: np.ndarray) -> float:
    """Largest mean |difference| between consecutive samples: ~0.1 for a still mouth.

    (Consecutive, not from the first sample: the video encoder's quality ramps up
    after connecting and after motion, which shifts a still picture by ~1-2 grey levels.)
    """
    return float(np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2)).max())


def _events(page, source: str = "datachannel") -> list[dict]:
    """The events the page received on ``source`` (its "events" data channel by default)."""
    return page.evaluate("(source) => eventLog.filter(e => e.source === source)", source)


# Every utterance that started has finished (on the page's data channel).
ALL_FINISHED_JS = """() => {
  const dc = eventLog.filter(e => e.source === 'datachannel');
  const started = dc.filter(e => e.type === 'playback_started').map(e => e.utterance);
  const finished = new Set(dc.filter(e => e.type === 'playback_finished').map(e => e.utterance));
  return started.length > 0 && started.every(u => finished.has(u));
}"""


def _wait(page, js: str, timeout_ms: int, what: str, server) -> None:
    """page.wait_for_function, failing with the page's state and the server log's path."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(js, timeout=timeout_ms)
    except PlaywrightTimeout:
        state = page.evaluate("""() => ({status: document.getElementById('status').textContent,
            micstate: document.getElementById('micstate').textContent, ws: ws && ws.readyState,
            pc: pc && pc.connectionState, channel: channel && channel.readyState,
            events: eventLog.map(e => `${e.source}:${e.type}:${e.utterance}`)})""")
        pytest.fail(f"{what}: not within {timeout_ms} ms; page: {state}; server log: {server.log}")


def _mic_moves_mouth(page, mode: str, server) -> dict:
    t0 = time.monotonic()
    _connect(page, mode)
    box = _mouth_box(page)
    idle = _sample(page, box, IDLE_MS)
    page.click("#mic")
    _wait(page, "mic.on", 10000, f"{mode} mic on", server)
    page.evaluate("window.levels = []; window.levelTimer = setInterval(() => levels.push(mic.level), 100)")
    talking = _sample(page, box, MIC_MS)
    page.screenshot(path=str(SCREENSHOT_DIR / f"browser-{mode}.png"), full_page=True)
    level = page.evaluate("clearInterval(levelTimer); Math.max(...levels)")  # loudest meter reading, dBFS
    speaking_seen = [e["type"] for e in _events(page)]
    page.click("#mic")
    _wait(page, "!mic.on", 10000, f"{mode} mic off", server)
    # Switching the mic off ends the utterance: what was sent plays out, then playback_finished.
    _wait(page, ALL_FINISHED_JS, 8000, f"{mode} mic off: playback_finished for every utterance", server)
    moving = _motion(talking, idle[-1])
    report = {"mode": mode, "idle_jitter": round(_jitter(idle), 2), "talking_p90": round(float(np.percentile(moving, 90)), 1),
              "level_max_dbfs": round(level, 1), "events": speaking_seen, "events_after_off": [e["type"] for e in _events(page)],
              "micstate": page.inner_text("#micstate"), "status": page.inner_text("#status"),
              "seconds": round(time.monotonic() - t0, 1)}
    print(report)
    where = f"{report}\nserver log: {server.log}"
    assert report["idle_jitter"] < STILL, f"mouth moved before the mic was on: {where}"
    assert report["talking_p90"] > MOVING, f"mouth did not move with the {mode} mic: {where}"
    assert "playback_started" in speaking_seen, f"no playback_started event while the mic was on: {where}"
    assert level > -40, f"level meter below -40 dBFS all the time the mic was on: {where}"
    return report


def test_webrtc_mic_moves_the_mouth(page, browser_server):
    _mic_moves_mouth(page, "lipsync", browser_server)


def test_websocket_mic_moves_the_mouth(page, browser_server):
    report = _mic_moves_mouth(page, "websocket", browser_server)
    assert "messages sent" in report["micstate"]
    on_socket = [e["type"] for e in _events(page, "ws")]
    assert "playback_started" in on_socket, f"/ws carried no playback_started (it should carry the events too): {on_socket}"


def test_say_it_interrupt_and_upload_without_a_mic(page, browser_server, speech_wav):
    """The existing controls: "Say it" moves the mouth, "Interrupt" stills it, a file uploads."""
    _connect(page, "off")
    box = _mouth_box(page)
    idle = _sample(page, box, 500)
    page.click("#say")
    talking = _sample(page, box, 2000)
    page.screenshot(path=str(SCREENSHOT_DIR / "browser-off.png"), full_page=True)
    page.click("#hush")
    page.wait_for_timeout(300)
    after = _sample(page, box, 1000)
    moving = _motion(talking, idle[-1])
    where = f"server log: {browser_server.log}"
    assert np.percentile(moving, 90) > MOVING, f"Say it: the mouth did not move {moving.round(1)}; {where}"
    assert _jitter(after) < STILL, f"Interrupt: the mouth kept moving {_motion(after, after[0]).round(1)}; {where}"
    events = _events(page)
    types = [e["type"] for e in events]
    assert "playback_started" in types and "text" in types, f"events: {types}; {where}"
    assert any(e["type"] == "playback_finished" and e["interrupted"] for e in events), f"events: {events}; {where}"
    assert any(e["type"] == "text" and e["text"] for e in events), f"events: {events}; {where}"
    # "Speak audio file" still uploads to /humanaudio.
    page.set_input_files("#file", str(speech_wav))
    page.click("#send")
    page.wait_for_function("/utterance \\d+ queued/.test(document.getElementById('status').textContent)", timeout=5000)


API_KEY = "browser-test-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    _require_browser()
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("srvkey"), "--model", "default", "--api_key", API_KEY)
    yield srv
    srv.stop()


def test_page_with_an_api_key(chromium, keyed_server):
    """--api_key: the page sends the key with the offer, then the session's token (header,
    and ?token= on /ws); without the key the offer is refused and the page says so."""
    context = chromium.new_context()
    page = context.new_page()
    try:
        page.goto(keyed_server.url)
        page.check('input[name="micmode"][value="websocket"]')
        page.click("#start")
        _wait(page, "/error/.test(document.getElementById('status').textContent)", 10000, "refusal shown", keyed_server)
        assert "api key" in page.inner_text("#status").lower()
        assert page.evaluate("document.getElementById('keybox').open"), "the page did not open the key field"
        page.fill("#apikey", API_KEY)
        page.click("#start")
        _wait(page, "pc && pc.connectionState === 'connected' && ws && ws.readyState === 1", 20000, "connected", keyed_server)
        page.click("#say")
        _wait(page, "/utterance \\d+ queued/.test(document.getElementById('status').textContent)", 5000, "Say it", keyed_server)
        page.click("#mic")
        _wait(page, "eventLog.some(e => e.source === 'ws' && e.type === 'playback_started')", 10000,
              "events on /ws (opened with ?token=)", keyed_server)
        page.click("#mic")
        _wait(page, ALL_FINISHED_JS, 15000, "playback_finished for every utterance", keyed_server)
        page.evaluate("stop()")
    finally:
        context.close()
