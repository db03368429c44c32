"""RTMP push (rtmp.RtmpPush) into Debian's nginx with libnginx-mod-rtmp on loopback,
read back with PyAV: 25 fps H.264, AAC, and a flash + tone that left together arrive
together; an unreachable server is an error (and an event) within the timeout, never a
hang; the push ends with its session.

The session here is a stand-in (a real PlayoutBuffer whose slots a thread decides at
25 fps, as the WebRTC tracks would): the push reads it exactly as it reads a real one.
Without nginx and its RTMP module the tests skip (``apt-get install nginx
libnginx-mod-rtmp``); under REQUIRE_BROWSER_TESTS=1 (CI, which installs them in
.ci/run) they fail instead.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from client import free_port
from conftest import require_installed

HOW_TO_GET = "apt-get install nginx libnginx-mod-rtmp"
MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
FLASH = range(50, 75)  # slots with a white frame and a tone (2.0-3.0 s into the session)


def _require_nginx_rtmp():
    absent = shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists() or not MODULE.exists()
    require_installed("nginx with the RTMP module not installed" if absent else None, HOW_TO_GET)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """An nginx-rtmp on 127.0.0.1 (application ``live``); yields its rtmp:// base URL."""
    _require_nginx_rtmp()
    work = tmp_path_factory.mktemp("nginx")
    (work / "logs").mkdir()
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""load_module {MODULE};
daemon off;
master_process off;
worker_processes 1;
error_log {work}/logs/error.log info;
pid {work}/nginx.pid;
events {{ worker_connections 64; }}
rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;
    application live {{ live on; record off; }} }} }}
""")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx_bin, "-p", str(work), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nginx did not start: {(work / 'logs' / 'error.log').read_text()[-2000:]}")
            time.sleep(0.1)  # polling a subprocess until it listens
    yield f"rtmp://127.0.0.1:{port}/live"
    proc.terminate()
    proc.wait(10)


class StandInSession:
    """What RtmpPush uses of a session (id, bus, worker.playout), with a thread that
    decides one slot every 40 ms as the WebRTC tracks do. Slots in FLASH carry a white
    frame and a 440 Hz tone; the rest a dark noisy frame and silence."""

    def __init__(self, slots: int = 250) -> None:
        from playout import MediaUnit, PlayoutBuffer

        rng = np.random.default_rng(3)
        self.id = "e" * 32
        self.events: list[dict] = []
        self.bus = SimpleNamespace(publish=self.events.append)
        playout = PlayoutBuffer(lambda i: np.full((144, 96), 16, np.uint8), 4, idle_format="yuv420p",
                                capacity=slots)
        tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(640) / 16000)).astype(np.int16)
        for k in range(slots):
            video = rng.integers(20, 60, (144, 96), np.uint8)
            video[96:] = 128
            audio = np.zeros(640, np.int16)
            if k in FLASH:
                video[:96] = 235
                audio = tone
            playout.put(MediaUnit(video=video, audio=audio, loop_index=0, video_format="yuv420p"))
        self.worker = SimpleNamespace(playout=playout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tracks, args=(slots,), daemon=True)
        self._thread.start()

    def _tracks(self, slots: int) -> None:
        t0 = time.monotonic()
        for s in range(slots):
            if self._stop.wait(max(0.0, t0 + s * 0.04 - time.monotonic())):  # pacing, as the tracks' clock
                return
            self.worker.playout.unit_for_slot(s)

    def close(self) -> None:
        self._stop.set()
        self.worker.playout.close()


def read_back(url: str, seconds: float, out: dict) -> None:
    """Play ``url`` from nginx with PyAV for ``seconds``: video (time, mean luma of the
    top part) and audio (time, rms) per frame into ``out``."""
    import av

    video, audio = [], []
    out.update(video=video, audio=audio)
    with av.open(url, options={"rw_timeout": "5000000"}) as c:
        t0 = time.monotonic()
        for packet in c.demux():
            for frame in packet.decode():
                if packet.stream.type == "video":
                    video.append((float(frame.time), float(frame.to_ndarray(format="gray")[:48].mean())))
                else:
                    pcm = frame.to_ndarray().astype(np.float32)
                    audio.append((float(frame.time), frame.samples / frame.sample_rate, float(np.sqrt(np.mean(pcm**2)))))
            if time.monotonic() - t0 > seconds:
                break
        out["codecs"] = sorted(s.codec_context.name for s in c.streams)


def test_push_reaches_nginx_and_reads_back_in_sync(nginx):
    """A push into nginx-rtmp is played back: H.264 + AAC at 25 fps, continuous audio,
    and the white frames and the tone that shared slots arrive within a frame of each other."""
    from rtmp import RtmpPush

    session = StandInSession()
    url = f"{nginx}/avatar-key-123"

    async def run():
        push = RtmpPush(session, url)
        resource = await push.start()
        got: dict = {}
        reader = threading.Thread(target=read_back, args=(url, 5.0, got), daemon=True)
        reader.start()
        await asyncio.get_running_loop().run_in_executor(None, reader.join, 15)
        await push.stop()
        return push, resource, got

    try:
        push, resource, got = asyncio.run(run())
    finally:
        session.close()
    assert resource == f"{nginx}/..." and "avatar-key-123" not in resource, "the stream key is not shown"
    assert got["codecs"] == ["aac", "h264"], got.get("codecs")
    vt = np.array([t for t, _ in got["video"]])
    assert len(vt) >= 75 and np.allclose(np.diff(vt), 0.04, atol=0.002), "not 25 fps"
    at = np.array([t for t, _, _ in got["audio"]])
    assert np.all(np.abs(np.diff(at) - got["audio"][0][1]) < 0.002), "audio has gaps"
    white = [t for t, luma in got["video"] if luma > 150]
    loud = [t for t, _, rms in got["audio"] if rms > 0.05]
    assert white and loud, "the flash and the tone did not come through"
    assert abs(white[0] - loud[0]) <= 0.045, f"flash at {white[0]:.3f} s, tone at {loud[0]:.3f} s"
    assert push.stopped and push.done.result(1) is None and not session.events


def test_unreachable_server_is_an_error_not_a_hang(nginx):
    """A port nobody listens on: start() raises within the timeout, an error event says
    so, and neither names the stream key."""
    from rtmp import RtmpPush, RtmpPushError

    session = StandInSession(100)

    async def run():
        push = RtmpPush(session, f"rtmp://127.0.0.1:{free_port()}/live/secret-key", timeout_s=2.0)
        t0 = time.monotonic()
        with pytest.raises(RtmpPushError) as e:
            await push.start()
        return str(e.value), time.monotonic() - t0, push

    try:
        msg, took, push = asyncio.run(run())
    finally:
        session.close()
    assert took < 4.5 and push.stopped
    assert "failed" in msg and "secret-key" not in msg
    assert [e["source"] for e in session.events] == ["rtmp_push"] and "secret-key" not in session.events[0]["msg"]


def test_push_ends_with_its_session(nginx):
    """The session closes (its playout closes): the push finishes by itself."""
    from rtmp import RtmpPush

    session = StandInSession()

    async def run():
        push = RtmpPush(session, f"{nginx}/ending")
        await push.start()
        await asyncio.sleep(0.5)
        session.close()
        error = await asyncio.wait_for(asyncio.wrap_future(push.done), 5)
        return push, error

    push, error = asyncio.run(run())
    assert error is None and push.stopped and push.frames >= 10


def test_url_checks():
    from rtmp import check_rtmp_url, is_rtmp_url, redact

    assert is_rtmp_url("rtmp://a.example/live/k") and not is_rtmp_url("https://a.example/whip")
    assert check_rtmp_url("rtmps://a.example:443/app/key") == "rtmps://a.example:443/app/key"
    for bad in (None, "", "rtmp://", "rtmp://host", "http://host/app/key", "rtmp://h/app/k\r\nx", "rtmp://h/" + "a" * 3000,
                "rtmp://h:abc/app/s", "rtmp://h:99999/a/b", "rtmp://[/a/b"):
        with pytest.raises(ValueError):
            check_rtmp_url(bad)
    assert not is_rtmp_url("http://[") and not is_rtmp_url(None)
    assert redact("rtmp://h:abc/app/secret") == "rtmp://?/..."  # never raises, never names the key


def test_push_route_publishes_a_real_session_over_rtmp(nginx, server):
    """``POST /push`` with an rtmp:// URL: the server's session, speaking, is read back
    from nginx (25 fps H.264 + AAC with the speech in it); ``stop`` ends it."""
    from client import AvatarClient

    url = f"{nginx}/route-key-7"

    async def run():
        async with AvatarClient(server.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 20)
            r = await c.post("/push", {"sessionid": c.sessionid, "url": url})
            assert r["code"] == 0 and "route-key-7" not in r["resource"], r
            await c.say("This sentence goes out over RTMP to the media server. " * 2)
            got: dict = {}
            reader = threading.Thread(target=read_back, args=(url, 4.0, got), daemon=True)
            reader.start()
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 15)
            stopped = await c.post("/push", {"sessionid": c.sessionid, "stop": True})
            bad = await c.post("/push", {"sessionid": c.sessionid, "url": "rtmp://"})
            return got, stopped, bad

    got, stopped, bad = asyncio.run(run())
    assert got["codecs"] == ["aac", "h264"], got.get("codecs")
    vt = np.array([t for t, _ in got["video"]])
    assert len(vt) >= 60 and np.median(np.diff(vt)) == pytest.approx(0.04, abs=0.002)
    assert max(rms for _, _, rms in got["audio"]) > 0.01, "no speech in the RTMP stream"
    assert stopped == {"code": 0, "msg": "ok", "stopped": True} or stopped.get("stopped") is True, stopped
    assert bad["code"] != 0, bad
