"""A session's teardown gives its memory back (issue #8, item 3).

Closed sessions used to stay in reference cycles (the ASR thread's callbacks into its
worker; aiortc's peer connection holding the tracks, which hold the worker, and
``watch_rtcp``'s hooks, which hold the session) until one of CPython's rare full
collections, with every frame of their playout history (~0.4 MB each): RSS grew
~3 MB per session that spoke. Now reference counting frees a session as it closes,
and the registry hands glibc's free pages back to the OS.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import urllib.request
import weakref

import numpy as np

from basereal import BaseReal, SessionOptions
from client import AvatarClient, ServerProcess, free_port
from conftest import FakeAvatar, FakeModel, tone
from metrics import Metrics

SESSIONS = 50
WARMUP = 5  # RSS after these is the reference level
RSS_TOLERANCE = 0.10


def _proc(pid: int) -> tuple[int, int, int]:
    """(RSS kB, threads, open fds) of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


async def _poll(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def _speak_once(url: str, connected=None) -> None:
    """One session: connect, speak one /human sentence to the end, hang up.
    ``connected()`` is called once the peer is connected."""
    async with AvatarClient(url, keep_media=False) as c:
        await asyncio.wait_for(c.first_video.wait(), 20)
        if connected is not None:
            connected()
        r = await c.say("Hello there.")
        assert r["code"] == 0, r
        assert await _poll(c.is_speaking, 10), "the sentence never started playing"

        async def done() -> bool:
            return not await c.is_speaking()

        assert await _poll(done, 20), "the sentence never finished"


def _open_sessions(srv: ServerProcess) -> int:
    return len(srv.status()["sessions"])


def _referrer_path(obj, limit: int = 8) -> str:
    """What holds ``obj``: a chain of its first referrers (for a failure message)."""
    chain, seen = [], {id(obj)}
    for _ in range(limit):
        refs = [r for r in gc.get_referrers(obj)
                if id(r) not in seen and r is not chain and type(r).__name__ != "frame"]
        if not refs:
            break
        obj = refs[0]
        seen.add(id(obj))
        keys = f" keys={list(obj)[:5]}" if isinstance(obj, dict) else ""
        chain.append(f"{type(obj).__module__}.{type(obj).__qualname__}{keys}")
    return " <- ".join(chain) or "no gc-tracked referrer"


def test_sessions_that_speak_give_their_memory_back(tmp_path):
    """50 sessions that each speak one /human sentence: the RSS the last 10 leave (their
    median) is within 10 % of the level after the first 5, threads and file descriptors
    return to that level, and no per-session metric series is left behind."""
    srv = ServerProcess(tmp_path, "--max_session", "2")
    rss, threads, fds = [], [], []
    try:
        t0 = time.monotonic()
        for i in range(SESSIONS):
            asyncio.run(_speak_once(srv.url))
            deadline = time.monotonic() + 10
            while _open_sessions(srv) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _open_sessions(srv) == 0, f"session {i + 1} still open 10 s after its peer left"
            time.sleep(0.3)  # the trim runs off the loop once the worker is freed
            r, t, f = _proc(srv.proc.pid)
            rss.append(r)
            threads.append(t)
            fds.append(f)
        took = time.monotonic() - t0
        with urllib.request.urlopen(srv.url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        srv.stop()
    ref = rss[WARMUP - 1]
    level = float(np.median(rss[-10:]))  # the level the last sessions leave (one reading may catch a GC in flight)
    print(f"{SESSIONS} sessions in {took:.0f} s; RSS MB: after {WARMUP} {ref / 1024:.1f}, after the last 10 "
          f"{level / 1024:.1f} (median, {100 * (level / ref - 1):+.1f} %), peak {max(rss) / 1024:.1f}; "
          f"threads {threads[WARMUP - 1]} -> {threads[-1]}, fds {fds[WARMUP - 1]} -> {fds[-1]}")
    series = " ".join(f"{r / 1024:.0f}" for r in rss)
    assert level <= ref * (1 + RSS_TOLERANCE), f"RSS grew from {ref / 1024:.1f} to {level / 1024:.1f} MB: {series}"
    # A session's own threads are 4; aiortc's encoders use a pooled executor that is
    # made on demand, so allow one more pool thread than after the warm-up.
    assert threads[-1] <= max(threads[:WARMUP]) + 1, f"threads {threads}"
    assert fds[-1] <= max(fds[:WARMUP]) + 1, f"fds {fds}"
    assert 'session="' not in metrics, "per-session metric series outlived their sessions"


def test_a_closed_session_is_freed_by_reference_counting(tmp_path):
    """Without the cyclic GC, a session's worker, its playout buffer and the session
    itself are freed as soon as the session closes (nothing of ours is left in a cycle)."""
    import aioice.ice
    from aiohttp import web

    import app as app_mod
    from config import parse_args
    from webrtc import use_loopback_ice

    port = free_port()
    args = parse_args(["--tts", "espeak", "--port", str(port), "--avatars_dir", str(tmp_path / "avatars")])

    async def run() -> tuple[list[str], str]:
        application = app_mod.build_app(args)
        server = application[app_mod.SERVER]
        runner = web.AppRunner(application)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            def track() -> None:
                (session,) = server.registry.sessions.values()
                refs.update(session=weakref.ref(session), worker=weakref.ref(session.worker),
                            playout=weakref.ref(session.worker.playout))

            await _speak_once(f"http://127.0.0.1:{port}", track)

            async def closed() -> bool:
                return not server.registry.sessions

            assert await _poll(closed, 10), "the session did not close when its peer left"

            async def freed() -> bool:
                return all(r() is None for r in refs.values())

            await _poll(freed, 3)
            alive = [name for name, r in refs.items() if r() is not None]
            held = _referrer_path(refs[alive[0]]()) if alive else ""
            return alive, held
        finally:
            await runner.cleanup()

    refs: dict[str, weakref.ref] = {}
    saved_hosts = aioice.ice.get_host_addresses
    use_loopback_ice()
    gc.collect()
    gc.disable()
    try:
        alive, held = asyncio.run(run())
    finally:
        gc.enable()
        aioice.ice.get_host_addresses = saved_hosts
    assert not alive, f"still alive after close without the cyclic GC: {alive}; {alive[0]} held by {held}"


def test_a_stopped_worker_is_freed_by_reference_counting():
    """BaseReal.stop cuts the worker <-> ASR thread cycle (callbacks into the worker)."""
    w = BaseReal("s" * 32, FakeModel(), FakeAvatar(4), SessionOptions(), Metrics().session("s"))
    w.start()
    w.put_audio(np.concatenate([tone(0.3), np.zeros(1600, np.float32)]))
    time.sleep(0.3)
    ref = weakref.ref(w)
    gc.disable()
    try:
        w.stop()
        del w
        alive = ref() is not None
        held = _referrer_path(ref()) if alive else ""
    finally:
        gc.enable()
    assert not alive, f"a stopped worker outlives its last reference: held by {held}"
