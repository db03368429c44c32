"""``GET /stream/<sessionid>.mp4``: a session's live media as fragmented MP4 over HTTP.

Each request gets its own mux thread (``muxer.py``): a :class:`muxer.SlotFollower` on
the session's playout (the units the WebRTC tracks send, on the session clock) into a
:class:`muxer.MP4Muxer` (H.264 + AAC, ~100 ms fragments, the first one starting with
a keyframe) into a bounded :class:`muxer.ByteChannel`, which the handler writes out
as a chunked response. The stream starts at the session's next slot: the init
segment (``ftyp`` + ``moov``) leaves within one slot, the first decodable fragment
about 120 ms later. Chromium's ``<video>`` plays it (tests/test_fmp4.py); it is the
standard fragmented MP4 that ``ffplay`` and VLC read (not tested here: not installed).

Policy for a slow client: the mux thread never waits for the client; when a reader
is more than ``STREAM_BUFFER_BYTES`` behind, it is *dropped* (the response ends; a
player reconnects and gets a fresh stream from a keyframe). One encode per reader:
at most ``--stream_max_readers`` readers per session (429 beyond).

Auth as the other per-session GET routes: the session's token (or the API key) as
``Authorization: Bearer`` or ``?token=``; 404 unknown session, 401 wrong token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING

from aiohttp import web

from api import HTTPError
from muxer import ByteChannel, ChannelClosed, MP4Muxer, SlotFollower

if TYPE_CHECKING:
    from playout import PlayoutBuffer

log = logging.getLogger(__name__)

# Unread bytes a reader may be behind before it is dropped: at the ~0.5-2 Mbit/s of a
# talking head at CRF 23, several seconds of media (beyond what the sockets buffer).
STREAM_BUFFER_BYTES = 2 * 1024 * 1024


def mux_stream(playout: "PlayoutBuffer", channel: ByteChannel, stop: threading.Event) -> None:
    """The mux thread of one reader: follow ``playout`` into ``channel`` until ``stop``,
    the session's end (the playout closes) or the reader is gone/dropped."""
    muxer = MP4Muxer(channel)
    try:
        for slot, unit, audible in SlotFollower(playout, stop):
            muxer.add(slot, unit, audible)
    except ChannelClosed:
        pass
    except Exception:
        log.exception("fMP4 stream: muxing failed")
    finally:
        try:
            muxer.close()  # the last fragment, when the reader is still there
        except Exception:  # the sink is gone (ChannelClosed, or PyAV's error for it): nothing more to write
            pass
        channel.finish()


class StreamRoute:
    """The ``/stream/<sessionid>.mp4`` handler and its per-session reader counts.

    Args:
        server: the AvatarServer (``session``, ``args.stream_max_readers``).
    """

    def __init__(self, server) -> None:
        self.server = server
        self.readers: Counter[str] = Counter()
        self.dropped = 0  # readers dropped for reading too slowly

    @property
    def max_readers(self) -> int:
        return getattr(self.server.args, "stream_max_readers", 4)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sessionid"]
        session = self.server.session({"sessionid": sid}, request)
        if self.readers[session.id] >= self.max_readers:
            raise HTTPError(429, f"this session already has {self.max_readers} stream readers (--stream_max_readers)")
        response = web.StreamResponse(headers={"Content-Type": "video/mp4", "Cache-Control": "no-store"})
        if request.method == "HEAD":
            return response
        response.enable_chunked_encoding()
        channel = ByteChannel(asyncio.get_running_loop(), STREAM_BUFFER_BYTES)
        stop = threading.Event()
        thread = threading.Thread(target=mux_stream, args=(session.worker.playout, channel, stop),
                                  name=f"fmp4-{session.id[:8]}", daemon=True)
        self.readers[session.id] += 1
        try:
            await response.prepare(request)
            thread.start()
            while data := await channel.read():
                await response.write(data)
            if channel.overflowed:
                self.dropped += 1
                log.info("fMP4 reader of %s dropped: more than %d bytes behind", session.id[:8], STREAM_BUFFER_BYTES)
            else:
                await response.write_eof()
        except ConnectionError:
            pass  # the reader left
        finally:
            stop.set()
            channel.close()
            self.readers[session.id] -= 1
            if self.readers[session.id] <= 0:
                del self.readers[session.id]
        return response


def setup(app: web.Application, server) -> StreamRoute:
    """Register ``GET /stream/{sessionid}.mp4`` on ``app`` for ``server``."""
    route = StreamRoute(server)
    app.router.add_get("/stream/{sessionid}.mp4", route.handle)
    return route
