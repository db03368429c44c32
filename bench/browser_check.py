"""The web page in a real browser: headless Chromium connects, plays and speaks.

Run by hand (not part of the test suite: it needs Debian's ``chromium`` and the
``playwright`` Python package, neither of which the project installs)::

    apt-get install chromium && .venv/bin/pip install playwright
    .venv/bin/python bench/browser_check.py [--out r.json] [--screenshot talking.png]

Starts ``app.py``, opens the page, presses Start, types a sentence and presses
"Say it", then reads the browser's WebRTC stats: frames decoded, frame rate, packets
lost, whether audio and video arrived in one MediaStream (so the browser lip-syncs
them), and the mean jitter-buffer delay per track. Prints JSON.
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
                   packetsLost: r.packetsLost, jitterBufferDelay: r.jitterBufferDelay,
                   jitterBufferEmittedCount: r.jitterBufferEmittedCount};
  });
  return out;
}"""


async def run(chromium: str, seconds: float, screenshot: Path | None) -> dict:
    from playwright.async_api import async_playwright

    srv = ServerProcess(Path(tempfile.mkdtemp()), "--model", "default", "--log_level", "WARNING")
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.goto(srv.url)
            await page.click("#start")
            await page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20000)
            await page.fill("#text", "Hello from the browser. My lips move while I speak, in sync with my voice.")
            await page.click("#say")
            await asyncio.sleep(1.2)
            if screenshot:
                await page.screenshot(path=str(screenshot))
            await asyncio.sleep(max(0.0, seconds - 1.2))
            stats = await page.evaluate(STATS_JS)
            same_stream = await page.evaluate(
                "document.getElementById('video').srcObject.id === document.getElementById('audio').srcObject.id"
            )
            status = await page.inner_text("#status")
            await browser.close()
    finally:
        srv.stop()
    for s in stats.values():
        n = s.pop("jitterBufferEmittedCount") or 0
        s["mean_jitter_buffer_ms"] = round(1000 * s.pop("jitterBufferDelay") / n, 1) if n else None
    return {"status": status, "one_media_stream": same_stream, "inbound": stats, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--seconds", type=float, default=6.0, help="how long to play before reading stats")
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = asyncio.run(run(args.chromium, args.seconds, args.screenshot))
    emit(result, args.out)


if __name__ == "__main__":
    main()
