"""The web page in a real browser: headless Chromium connects, plays and speaks.

Run by hand (not part of the test suite: it needs Debian's ``chromium`` and the
``playwright`` Python package, neither of which the project installs)::

    apt-get install chromium && .venv/bin/pip install playwright
    .venv/bin/python bench/browser_check.py [--mic lipsync|websocket] [--out r.json] [--screenshot talking.png]

Starts ``app.py``, opens the page, presses Start, types a sentence and presses
"Send" in echo mode (or, with ``--mic``, picks that lipsync microphone mode before
Start and switches the mic on: Chromium's fake microphone plays ``--mic_wav``,
looped), then reads the browser's WebRTC stats: frames decoded, frame rate, packets
lost, whether audio and video arrived in one MediaStream (so the browser lip-syncs
them), and the mean jitter-buffer delay per track, plus the page's event log and
its live stats panel (the last second, and the server's /stats). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from client import ServerProcess  # noqa: E402

# Chromium flags for a headless run on a closed machine (see shared machine notes);
# the last one lets WebRTC offer loopback candidates.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
]
STATS_JS = """async () => {
  const out = {};
  (await pc.getStats()).forEach(r => {
    if (r.type !== 'inbound-rtp') return;
    out[r.kind] = {framesDecoded: r.framesDecoded ?? null, framesPerSecond: r.framesPerSecond ?? null,
                   framesDropped: r.framesDropped ?? null, packetsLost: r.packetsLost,
                   jitterBufferDelay: r.jitterBufferDelay, jitterBufferEmittedCount: r.jitterBufferEmittedCount,
                   concealedSamples: r.concealedSamples ?? null, totalSamplesReceived: r.totalSamplesReceived ?? null};
  });
  return out;
}"""


async def launch(p, chromium: str, *flags: str):
    """Headless Chromium from ``chromium`` (a path; playwright downloads nothing) with
    CHROMIUM_FLAGS plus ``flags``. ``p``: a started ``async_playwright()``."""
    return await p.chromium.launch(executable_path=chromium, args=[*CHROMIUM_FLAGS, *flags])


async def start_page(browser, url: str, mic: str = "off"):
    """Open the project's page at ``url``, pick microphone mode ``mic``, press Start and
    wait (up to 20 s) until the video shows a frame. Returns the playwright page; the
    page's globals (``pc``, ``sessionid``, ``token``, ``eventLog``) are then set."""
    page = await browser.new_page()
    await page.goto(url)
    await page.check(f'input[name="micmode"][value="{mic}"]')
    await page.click("#start")
    await page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20000)
    return page


def jitter_buffer_ms(delay_s: float | None, emitted: int | None) -> float | None:
    """Mean jitter-buffer delay (ms) from getStats' ``jitterBufferDelay`` (s, summed over
    emitted samples/frames) and ``jitterBufferEmittedCount``; None when nothing was emitted."""
    return round(1000 * delay_s / emitted, 1) if emitted and delay_s is not None else None


async def run(chromium: str, seconds: float, screenshot: Path | None, mic: str, mic_wav: Path) -> dict:
    from playwright.async_api import async_playwright

    srv = ServerProcess(Path(tempfile.mkdtemp()), "--model", "default", "--log_level", "WARNING")
    try:
        async with async_playwright() as p:
            browser = await launch(p, chromium, f"--use-file-for-fake-audio-capture={mic_wav}")
            page = await start_page(browser, srv.url, mic)
            if mic == "off":
                await page.fill("#text", "Hello from the browser. My lips move while I speak, in sync with my voice.")
                await page.click("#say")
            else:
                await page.click("#mic")
            await asyncio.sleep(1.2)
            if screenshot:
                await page.screenshot(path=str(screenshot))
            await asyncio.sleep(max(0.0, seconds - 1.2))
            stats = await page.evaluate(STATS_JS)
            same_stream = await page.evaluate(
                "document.getElementById('video').srcObject.id === document.getElementById('audio').srcObject.id"
            )
            status = await page.inner_text("#status")
            events = await page.evaluate("eventLog.filter(e => e.source === 'datachannel').map(e => e.type)")
            panel = await page.evaluate("({...liveStats})")
            await page.evaluate("stop()")
            await browser.close()
    finally:
        srv.stop()
    for s in stats.values():
        s["mean_jitter_buffer_ms"] = jitter_buffer_ms(s.pop("jitterBufferDelay"), s.pop("jitterBufferEmittedCount"))
    return {"mic": mic, "status": status, "one_media_stream": same_stream, "inbound": stats, "events": events,
            "stats_panel": panel, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--seconds", type=float, default=6.0, help="how long to play before reading stats")
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--mic", choices=("off", "lipsync", "websocket"), default="off",
                    help="speak into the page's microphone in this mode instead of typing")
    ap.add_argument("--mic_wav", type=Path, default=ROOT.parent / "shared" / "media" / "yongen.wav",
                    help="16-bit PCM WAV that Chromium's fake microphone plays")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = asyncio.run(run(args.chromium, args.seconds, args.screenshot, args.mic, args.mic_wav))
    emit(result, args.out)


if __name__ == "__main__":
    main()
