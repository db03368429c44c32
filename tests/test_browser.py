"""The demo page in headless Chromium: a session, a conversation, the microphone.

Against ``app.py`` in a subprocess (``--model default``, espeak) and, for chat and
voice conversation, a fake OpenAI-compatible endpoint (``tests/fake_openai.py``:
chat completions and transcriptions). What is checked:

- Start: ``framesDecoded`` rises at >= 20 fps and audio packets arrive; typed echo
  text moves the mouth (canvas captures of the <video> around the mouth), subtitles
  and the avatar's line appear, Interrupt stills it; the live stats panel shows
  numbers (browser getStats and the server's /stats); the chosen voice and avatar
  go with the offer and each /human; the pickers list GET /avatars and /voices.
- Chat mode answers typed text through the LLM (user and avatar lines, the mouth
  moves); an LLM failure is shown. Converse mode: Chromium's fake microphone asks a
  question, the transcript and the avatar's answer appear in the log.
- Errors shown: "server full" from a server with ``--max_session 1``, a session the
  server no longer has, a refused key (``--api_key``).
- The microphone's two lipsync ways move the mouth; the page's CRC-32 and framing,
  the AudioWorklet's 20 ms chunks, the socket protocol against a stub; upload.

Chromium's fake capture device plays a speech WAV as the microphone
(``--use-file-for-fake-audio-capture``, looped). A failing test leaves a screenshot
of each page it opened in /tmp/browser-fail-<test>-<n>.png (and the mic tests one
in /tmp/browser-<mode>.png either way). About 90 s in all on 2 cores.

Needs Debian's chromium and the playwright package (never a downloaded browser);
the tests skip without them, and fail instead under REQUIRE_BROWSER_TESTS=1 (CI).
"""

from __future__ import annotations

import base64
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_MEDIA, require_installed

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
QUESTION_S = 2.8        # the first 2.8 s of sun.wav: two phrases, 0.26 s apart (one turn)
QUESTION_GAP_S = 4.0    # silence after the question
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
    require_installed(_missing(), HOW_TO_GET)


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
def question_wav(tmp_path_factory) -> Path:
    """A spoken question, then silence (a turn end for the server's VAD), for converse mode.

    Chromium loops the file: the silence leaves the avatar time to answer before the
    question comes again (the test switches the mic off once it is transcribed)."""
    import soundfile as sf

    wav = SHARED_MEDIA / "sun.wav"
    if wav.exists():
        pcm, rate = sf.read(wav, dtype="float32")
        pcm = pcm[: int(QUESTION_S * rate)]
    else:
        from tts import make_tts

        tts = make_tts("espeak")
        pcm, rate = tts.synthesize("Hello avatar. What will the weather be like tomorrow?"), tts.sample_rate_out
    pcm = np.concatenate([pcm, np.zeros(int(QUESTION_GAP_S * rate), np.float32)])
    path = tmp_path_factory.mktemp("question") / "question.wav"
    sf.write(path, pcm, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def playwright_api():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def _launch(p, mic_wav: Path):
    return p.chromium.launch(executable_path=str(CHROMIUM),
                             args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic_wav}"])


@pytest.fixture(scope="module")
def chromium(playwright_api, speech_wav):
    browser = _launch(playwright_api, speech_wav)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def converse_chromium(playwright_api, question_wav):
    browser = _launch(playwright_api, question_wav)
    yield browser
    browser.close()


@pytest.fixture
def open_page(request):
    """``open_page(browser, url)``: a page in a fresh context. At the end each page's
    session is stopped (the server frees it at once) and, when the test failed, a
    screenshot of each page is saved."""
    opened = []
    failed_before = request.session.testsfailed

    def open_(browser, url: str):
        context = browser.new_context()
        pg = context.new_page()
        pg.goto(url)
        opened.append((context, pg))
        return pg

    yield open_
    failed = request.session.testsfailed > failed_before  # the call's report is logged before teardown
    for n, (context, pg) in enumerate(opened):
        try:
            if failed:
                path = SCREENSHOT_DIR / f"browser-fail-{request.node.name}-{n}.png"
                pg.screenshot(path=str(path), full_page=True)
                print(f"screenshot: {path}")
            pg.evaluate("pc && stop()")
        except Exception as e:  # a crashed page: nothing to show or stop
            print(f"page {n}: {e}")
        context.close()


@pytest.fixture
def page(open_page, chromium, browser_server):
    return open_page(chromium, browser_server.url)


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
            events: eventLog.map(e => `${e.source}:${e.type}:${e.utterance}`),
            log: [...document.querySelectorAll('#chatlog .line')].map(l => l.textContent)})""")
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


def test_lipsync_mic_moves_the_mouth(page, browser_server):
    _mic_moves_mouth(page, "lipsync", browser_server)


def test_websocket_mic_moves_the_mouth(page, browser_server):
    report = _mic_moves_mouth(page, "websocket", browser_server)
    assert "messages sent" in report["micstate"]
    on_socket = [e["type"] for e in _events(page, "ws")]
    assert "playback_started" in on_socket, f"/ws carried no playback_started (it should carry the events too): {on_socket}"


# Frames decoded and audio packets received (inbound-rtp), and the audio's energy.
INBOUND_JS = """async () => {
  const out = {t: performance.now(), frames: 0, packets: 0, energy: 0};
  (await pc.getStats()).forEach(r => {
    if (r.type !== 'inbound-rtp') return;
    if (r.kind === 'video') out.frames = r.framesDecoded || 0;
    else { out.packets = r.packetsReceived || 0; out.energy = r.totalAudioEnergy || 0; }
  });
  return out;
}"""
STATS_PANEL = ("stat-fps", "stat-dropped", "stat-jb-video", "stat-jb-audio", "stat-audio-packets", "stat-rtt",
               "stat-start-latency", "stat-frames-sent", "stat-frames-late", "stat-server-dropped", "stat-underruns")
MIN_FPS = 20.0


def _record_api(page) -> list[dict]:
    """The page's POSTs to the API as they are answered: {path, body, status}."""
    import json
    from urllib.parse import urlparse

    calls: list[dict] = []

    def on_response(response) -> None:
        req = response.request
        if req.method == "POST" and req.headers.get("content-type", "").startswith("application/json"):
            calls.append({"path": urlparse(req.url).path, "body": json.loads(req.post_data or "{}"), "status": response.status})

    page.on("response", on_response)
    return calls


def _log_lines(page, kind: str) -> list[str]:
    """The text of the conversation log's lines of ``kind`` (user, transcript, avatar, system, error)."""
    return page.evaluate("(k) => [...document.querySelectorAll(`#chatlog .line.${k} .text`)].map(e => e.textContent)", kind)


def test_start_plays_speaks_interrupts_and_shows_stats(page, browser_server, speech_wav):
    """Start: >= 20 fps decoded and audio arriving; echo text moves the mouth with
    subtitles and the avatar's line; Interrupt stills it; the stats panel shows
    numbers; the chosen voice goes with the offer and /human; a file uploads."""
    calls = _record_api(page)
    page.wait_for_function("config.loaded", timeout=5000)
    voices = page.evaluate("[...document.getElementById('voice').options].map(o => o.value)")
    voice = next(v for v in voices if v != page.input_value("#voice"))  # not the default
    page.select_option("#voice", voice)
    _connect(page, "off")
    where = f"server log: {browser_server.log}"
    # video at >= 20 fps and audio, over 2 s
    a = page.evaluate(INBOUND_JS)
    page.wait_for_timeout(2000)
    b = page.evaluate(INBOUND_JS)
    fps = (b["frames"] - a["frames"]) / ((b["t"] - a["t"]) / 1000)
    assert fps >= MIN_FPS, f"decoded {fps:.1f} fps; {where}"
    assert b["packets"] - a["packets"] >= 50, f"audio: {b['packets'] - a['packets']} packets in 2 s; {where}"
    # echo text: the mouth moves, the subtitle and the avatar's line appear
    box = _mouth_box(page)
    idle = _sample(page, box, 500)
    page.fill("#text", "Hello from the browser test. My lips move while I speak, in sync with my voice.")
    page.click("#say")
    page.wait_for_function("document.getElementById('subtitle').textContent.length > 0", timeout=5000)
    talking = _sample(page, box, 2000)
    page.click("#hush")
    page.wait_for_timeout(300)
    after = _sample(page, box, 1000)
    moving = _motion(talking, idle[-1])
    assert np.percentile(moving, 90) > MOVING, f"Say it: the mouth did not move {moving.round(1)}; {where}"
    assert _jitter(after) < STILL, f"Interrupt: the mouth kept moving {_motion(after, after[0]).round(1)}; {where}"
    events = _events(page)
    types = [e["type"] for e in events]
    assert "playback_started" in types and "text" in types, f"events: {types}; {where}"
    assert any(e["type"] == "playback_finished" and e["interrupted"] for e in events), f"events: {events}; {where}"
    assert page.inner_text("#speaking") == "idle (cut)"
    avatar = _log_lines(page, "avatar")
    assert avatar and avatar[0].startswith("Hello from the browser test."), avatar
    assert page.locator("#chatlog .line.avatar.cut").count() == 1, "the cut-off line is not marked"
    # the stats panel: every figure a number, the decoded rate >= 20 fps
    _wait(page, "liveStats['stat-start-latency'] != null", 3000, "server figures in the stats panel", browser_server)
    panel = {k: page.inner_text(f"#{k}") for k in STATS_PANEL}
    numbers = {k: float(v) for k, v in panel.items() if v.replace(".", "", 1).isdigit()}
    assert set(numbers) == set(STATS_PANEL), f"stats panel: {panel}"
    assert numbers["stat-fps"] >= MIN_FPS and numbers["stat-frames-sent"] > 0 and numbers["stat-rtt"] < 100, panel
    assert numbers["stat-audio-packets"] > 0 and 0 < numbers["stat-start-latency"] < 2000, panel
    # the chosen voice went with the offer and with /human, and was taken
    offer = next(c for c in calls if c["path"] == "/offer")
    human = next(c for c in calls if c["path"] == "/human")
    assert offer["body"]["voice"] == voice and offer["body"]["avatar"] == "default" and offer["status"] == 200, offer
    assert human["body"]["voice"] == voice and human["body"]["type"] == "echo" and human["status"] == 200, human
    # "Speak audio file" still uploads to /humanaudio
    page.set_input_files("#file", str(speech_wav))
    page.click("#send")
    page.wait_for_function("/utterance \\d+ queued/.test(document.getElementById('status').textContent)", timeout=5000)
    print({"fps": round(fps, 1), "panel": panel})


def _get(url: str, path: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url + path, timeout=5) as r:
        return json.loads(r.read())


def test_pickers_list_the_servers_avatars_and_voices(page, browser_server):
    """The pickers list GET /avatars and /voices with their defaults chosen; without an
    LLM, chat and converse are off with a hint naming --llm_url."""
    page.wait_for_function("config.loaded", timeout=5000)
    avatars, voices = _get(browser_server.url, "/avatars"), _get(browser_server.url, "/voices")
    options = lambda sel: page.evaluate(f"[...document.querySelectorAll('{sel} option')].map(o => o.value)")  # noqa: E731
    assert options("#avatar") == avatars["avatars"] and page.input_value("#avatar") == avatars["default"]
    assert options("#voice") == [v["id"] for v in voices["voices"]] and page.input_value("#voice") == voices["default"]
    assert page.is_disabled('input[name="saymode"][value="chat"]')
    assert page.is_disabled('input[name="micmode"][value="converse"]')
    assert "--llm_url" in page.inner_text("#chathint") and "--llm_url" in page.inner_text("#conversehint")


# -- a conversation: chat and voice, with a fake LLM and speech-to-text ---------------------
REPLY = "It will be sunny and warm tomorrow. Enjoy the good weather!"
TRANSCRIPT = "What will the weather be like tomorrow?"


@pytest.fixture(scope="module")
def fake_llm():
    from fake_openai import FakeOpenAI

    with FakeOpenAI(reply=REPLY, transcript=TRANSCRIPT, token_delay=0.01) as fake:
        yield fake


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, fake_llm):
    """An LLM and speech-to-text (both the fake), one session at a time (for "server full")."""
    _require_browser()
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("chat"), "--model", "default", "--llm_url", fake_llm.url,
                        "--stt", "openai", "--stt_url", fake_llm.url, "--max_session", "1")
    yield srv
    srv.stop()


def _no_sessions(server) -> None:
    """Wait until the server holds no session (the previous test's page has stopped)."""
    from conftest import wait_for

    assert wait_for(lambda: not server.status()["sessions"], 5), f"sessions linger: {server.status()}"


def test_chat_mode_answers_typed_text(open_page, chromium, chat_server, fake_llm):
    """Chat: the typed question is the user's line, the LLM's reply the avatar's
    line (sentence by sentence, from text events) and the mouth moves; an LLM that
    fails is shown as an error."""
    _no_sessions(chat_server)
    page = open_page(chromium, chat_server.url)
    page.wait_for_function("config.loaded", timeout=5000)
    assert page.is_enabled('input[name="saymode"][value="chat"]') and page.inner_text("#chathint") == ""
    assert page.is_enabled('input[name="micmode"][value="converse"]')
    _connect(page, "off")
    page.check('input[name="saymode"][value="chat"]')
    box = _mouth_box(page)
    idle = _sample(page, box, 300)
    page.fill("#text", "How is the weather?")
    page.click("#say")
    talking = _sample(page, box, 2500)
    _wait(page, f"document.querySelector('#chatlog .line.avatar')?.textContent.includes({REPLY!r})", 10000,
          "the avatar's reply in the log", chat_server)
    assert _log_lines(page, "user") == ["How is the weather?"]
    assert _log_lines(page, "avatar") == [REPLY]
    assert fake_llm.chats[-1].messages[-1] == {"role": "user", "content": "How is the weather?"}
    moving = _motion(talking, idle[-1])
    assert np.percentile(moving, 90) > MOVING, f"chat reply: the mouth did not move {moving.round(1)}; {chat_server.log}"
    assert page.input_value("#text") == "", "the sent question stays in the box"
    # an LLM that fails: the error event is shown in the log and the status line
    fake_llm.status = 500
    try:
        page.fill("#text", "Are you there?")
        page.click("#say")
        _wait(page, "document.querySelector('#chatlog .line.error') !== null", 10000, "the LLM's failure shown", chat_server)
    finally:
        fake_llm.status = 200
    assert "error" in page.get_attribute("#status", "class")
    print({"log": page.evaluate("[...document.querySelectorAll('#chatlog .line')].map(l => l.textContent)")})


def test_converse_mode_answers_a_spoken_question(open_page, converse_chromium, chat_server, fake_llm):
    """Converse: the fake microphone asks; the transcript is the user's line and the
    avatar answers it (its line after the transcript, playback events for it)."""
    _no_sessions(chat_server)
    page = open_page(converse_chromium, chat_server.url)
    page.wait_for_function("config.loaded", timeout=5000)
    calls = _record_api(page)
    _connect(page, "converse")
    _wait(page, "mic.on", 5000, "converse: the mic on by itself", chat_server)
    assert not page.evaluate("document.getElementById('audio').muted"), "converse mutes the avatar"
    n_before = len(fake_llm.transcriptions)
    # one loop of the question is 2.8 s + 4 s of silence: a turn ends within ~8 s
    _wait(page, "document.querySelector('#chatlog .line.transcript') !== null", 15000, "the transcript", chat_server)
    page.click("#mic")  # no second question (it would barge in on the answer)
    # the reply's pieces (its first cut early, then whole sentences) join on one line
    _wait(page, "(document.querySelector('#chatlog .line.avatar .text') || {}).textContent"
          "?.startsWith('It will be sunny and warm tomorrow.')", 10000, "the avatar's answer", chat_server)
    assert _log_lines(page, "transcript")[0] == TRANSCRIPT
    kinds = page.evaluate("[...document.querySelectorAll('#chatlog .line')].map(l => l.className)")
    assert kinds.index("line transcript") < next(i for i, k in enumerate(kinds) if k.startswith("line avatar")), kinds
    assert len(fake_llm.transcriptions) > n_before
    assert fake_llm.chats[-1].messages[-1] == {"role": "user", "content": TRANSCRIPT}
    answer = next(e["utterance"] for e in _events(page) if e["type"] == "transcript")
    assert any(e["type"] == "playback_started" and e["utterance"] == answer for e in _events(page))
    offer = next(c for c in calls if c["path"] == "/offer")
    assert offer["body"]["mic"] == "converse" and offer["status"] == 200, offer


def test_server_full_and_session_gone_are_shown(open_page, chromium, chat_server):
    """A second page on a full server (--max_session 1) shows the 503's message and
    can start again; a session the server no longer has (its /stats answering 404)
    is shown and the page returns to Start."""
    _no_sessions(chat_server)
    first = open_page(chromium, chat_server.url)
    _connect(first, "off")
    second = open_page(chromium, chat_server.url)
    second.click("#start")
    _wait(second, "/server full/.test(document.getElementById('status').textContent)", 10000, "server full", chat_server)
    assert "HTTP 503" in second.inner_text("#status") and "error" in second.get_attribute("#status", "class")
    assert second.locator("#chatlog .line.error").count() == 1
    assert second.is_enabled("#start") and second.evaluate("pc === null"), "the refused page cannot start again"
    # the server drops the first page's session (as after a restart): /stats says 404
    first.route("**/stats?*", lambda route: route.fulfill(
        status=404, content_type="application/json", body='{"code": -1, "msg": "unknown session"}'))
    _wait(first, "/no longer has this session/.test(document.getElementById('status').textContent)", 5000,
          "session gone", chat_server)
    assert first.evaluate("pc === null") and first.is_enabled("#start") and first.is_disabled("#say")


API_KEY = "browser-test-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    _require_browser()
    from client import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("srvkey"), "--model", "default", "--api_key", API_KEY)
    yield srv
    srv.stop()


def test_page_with_an_api_key(open_page, chromium, keyed_server):
    """--api_key: the page asks for the key (GET /config answers 401), sends it with
    /config, /avatars, /voices and the offer, then the session's token (header, and
    ?token= on /ws); without the key the page says so and opens the key field."""
    page = open_page(chromium, keyed_server.url)
    page.check('input[name="micmode"][value="websocket"]')
    page.click("#start")
    _wait(page, "/error/.test(document.getElementById('status').textContent)", 10000, "refusal shown", keyed_server)
    assert "api key" in page.inner_text("#status").lower()
    assert page.evaluate("document.getElementById('keybox').open"), "the page did not open the key field"
    page.fill("#apikey", API_KEY)
    page.click("#start")
    _wait(page, "pc && pc.connectionState === 'connected' && ws && ws.readyState === 1", 20000, "connected", keyed_server)
    assert page.evaluate("document.getElementById('voice').options.length") > 1, "no voices listed with the key"
    page.click("#say")
    _wait(page, "/utterance \\d+ queued/.test(document.getElementById('status').textContent)", 5000, "Say it", keyed_server)
    page.click("#mic")
    _wait(page, "eventLog.some(e => e.source === 'ws' && e.type === 'playback_started')", 10000,
          "events on /ws (opened with ?token=)", keyed_server)
    page.click("#mic")
    _wait(page, ALL_FINISHED_JS, 15000, "playback_finished for every utterance", keyed_server)
