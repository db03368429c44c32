"""RTMP push: a session's media published to an ``rtmp://`` URL, for platforms that
only take RTMP (issue #11 item 7).

:class:`RtmpPush` follows the session's playout (:class:`muxer.SlotFollower`: the
units the WebRTC tracks send, on the session clock) into an :class:`muxer.FLVMuxer`
(H.264 ``ultrafast``/``zerolatency``, a keyframe a second, AAC) that FFmpeg's RTMP
client publishes, all in the push's own thread. Its interface is the one of
``whip.WhipPush`` (``start``, ``stop``, ``stopped``, ``resource``, ``report``), so the
``/push`` route can hold either:

    push = RtmpPush(session, url)       # for rtmp:// and rtmps:// URLs
    await push.start()                  # RtmpPushError: unreachable, refused, timeout
    ...
    await push.stop()

Errors (connect, publish refused, the connection lost mid-stream) are published as
``error`` events on the session's bus (``source: "rtmp_push"``), once, by the push
itself (``start``'s failures too: callers do not publish them again); the session
goes on. URLs are reported without their path past the application name (stream keys
are secrets).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from api import check_url
from muxer import FLVMuxer, SlotFollower

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # FFmpeg's rw_timeout for the RTMP connection (connect, handshake, each write)
STOP_TIMEOUT_S = 5.0  # stop() waits this long for the thread to finish the stream


class RtmpPushError(Exception):
    """A push that could not start: unreachable, refused, or no media within the timeout."""


def is_rtmp_url(url: Any) -> bool:
    """True for an ``rtmp://`` or ``rtmps://`` URL (the ``/push`` route's dispatch)."""
    if not isinstance(url, str):
        return False
    try:
        return urlsplit(url).scheme in ("rtmp", "rtmps")
    except ValueError:  # e.g. "http://[": not a URL at all (check_push_url says so)
        return False


def check_rtmp_url(url: Any) -> str:
    """An ``rtmp(s)://host[:port]/app/stream`` URL of at most ``api.MAX_URL_CHARS``.

    Raises:
        ValueError: with what is wrong (``api.BadURL`` for the checks all client URLs get).
    """
    parts = check_url(url, ("rtmp", "rtmps"), "an rtmp(s)://host[:port]/app/stream URL")
    if not parts.path.strip("/"):
        raise ValueError(f"'url' must look like rtmp://host[:port]/app/stream, got {redact(url)!r}")
    if any(c in url for c in "\r\n\0 "):
        raise ValueError("'url' must not contain spaces or control characters")
    return url


def redact(url: str) -> str:
    """``url`` without credentials and without its path past the first segment (never raises)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "rtmp://?/..."
    app = parts.path.strip("/").split("/", 1)[0]
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{port}/{app}/..."


class RtmpPush:
    """One session's audio and video published to an RTMP server, from a thread.

    Args:
        session: the ``sessions.Session`` (its ``worker.playout``, ``bus``, ``id``).
        url: the ``rtmp://`` URL (checked by :func:`check_rtmp_url`; ValueError).
        timeout_s: connection timeout and the longest a write may block (s).

    Attributes:
        resource: the URL, redacted (what a client may see).
        stopped: the push has ended (stopped, or failed mid-stream).
        done: a future resolved by the thread with None or the error message.
    """

    def __init__(self, session: Any, url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.session = session
        self.url = check_rtmp_url(url)
        self.resource = redact(url)
        self.timeout_s = timeout_s
        self.stopped = False
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self._live: concurrent.futures.Future = concurrent.futures.Future()  # first slot published
        self._stop = threading.Event()
        self.frames = 0
        self._thread = threading.Thread(target=self._run, name=f"rtmp-{session.id[:8]}", daemon=True)

    async def start(self) -> str:
        """Connect and publish the first slot. Returns :attr:`resource`.

        Raises:
            RtmpPushError: unreachable, refused, or nothing published within the timeout.
        """
        self._thread.start()
        try:
            error = await asyncio.wait_for(asyncio.wrap_future(self._live), self.timeout_s + 2.0)
        except TimeoutError:
            await self.stop()
            msg = f"RTMP push to {self.resource}: nothing published within {self.timeout_s + 2.0:g} s"
            self.report(msg)
            raise RtmpPushError(msg) from None
        if error is not None:
            self.stopped = True
            raise RtmpPushError(error)
        return self.resource

    async def stop(self) -> None:
        """End the push: finish the FLV stream and close the connection (idempotent)."""
        self.stopped = True
        self._stop.set()
        if self._thread.is_alive():
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.done), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("session %s: RTMP push did not finish within %g s", self.session.id[:8], STOP_TIMEOUT_S)

    def report(self, msg: str) -> None:
        """An ``error`` event on the session's bus (any thread)."""
        log.warning("session %s: %s", self.session.id[:8], msg)
        self.session.bus.publish({"type": "error", "msg": msg, "source": "rtmp_push"})

    def _run(self) -> None:
        error: str | None = None
        muxer = FLVMuxer(self.url, timeout_s=self.timeout_s)
        try:
            for slot, unit, audible in SlotFollower(self.session.worker.playout, self._stop):
                muxer.add(slot, unit, audible)
                self.frames += 1
                if not self._live.done():
                    self._live.set_result(None)
            muxer.close()
        except Exception as e:  # connect refused, publish refused, connection lost: FFmpeg's errors are OSErrors
            why = str(e).replace(self.url, self.resource)[:160]  # FFmpeg names the URL, key and all
            error = f"RTMP push to {self.resource} failed: {type(e).__name__}: {why}"
            self.report(error)
            try:
                muxer.close()
            except Exception:
                pass
        finally:
            self.stopped = True
            if not self._live.done():
                self._live.set_result(error or f"RTMP push to {self.resource}: the session ended")
            self.done.set_result(error)
