"""Fan-out through Janus: a session published into a Janus VideoRoom, encoded once.

Janus (https://janus.conf.meetecho.com, Debian package ``janus``) forwards one
publisher's RTP to any number of subscribers without decoding it, so an audience
costs this server one encode whatever its size. We talk to Janus' HTTP API (the
REST transport, ``/janus``) as aiortc's own Janus example does: ``create`` a Janus
session, ``attach`` the ``janus.plugin.videoroom`` plugin, ``joinandconfigure`` as a
publisher with our offer (non-trickle: every candidate in it), apply the answer that
comes back as an event on the long poll, which also keeps the Janus session alive.

Route: ``POST /janus {"sessionid", "room"?, "url"?}`` publishes the session and
answers ``{"code": 0, "room", "feed"}`` (``feed``: the publisher id subscribers join;
``room``: the one given, created when missing, or a new one); ``url`` defaults to
``--janus_url``. ``POST /janus {"sessionid", "stop": true}`` unpublishes. A session
has at most one Janus publication; it ends with the session. Failures (Janus
unreachable, a refusal, ``JANUS_TIMEOUT_S`` without an answer to a request) are
answered ``502`` and published as ``error`` events (``"source": "janus"``); the
message names Janus' error code, its own words go to the log only (the URL may be
a client's choice). A room created for a publication is destroyed when it ends
(unless another publisher uses it). Set-up: docs/deploy.md.

:class:`JanusSession` and :class:`JanusSubscriber` are also the subscriber side used by
the tests and benchmarks (``client.JanusViewer``); :class:`JanusProcess` runs a
loopback Janus from a config folder of its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

import wish
from api import HTTPError, check_url, ok, read_json
from webrtc import AvatarAudioTrack, AvatarVideoTrack, JoinPoint

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
JANUS_TIMEOUT_S = 10.0  # one request, or the wait for an asynchronous answer
POLL_S = 30.0  # Janus holds a long poll this long (then sends a keepalive)
ROOM_PUBLISHERS = 16  # publishers a room we create allows
MAX_ROOM = 2**53 - 1  # room ids are JSON integers


class JanusError(Exception):
    """Janus refused, answered something unexpected, or did not answer in time."""


class JanusSession:
    """One session on Janus' HTTP API, with its long-poll task.

    Args:
        url: the API root, e.g. ``http://127.0.0.1:8088/janus``.
    """

    def __init__(self, url: str) -> None:
        self.root = url.rstrip("/")
        self.url: str | None = None
        self.http: aiohttp.ClientSession | None = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._poll: asyncio.Task | None = None
        self.closed = False

    @staticmethod
    def _transaction() -> str:
        return secrets.token_hex(8)

    async def _post(self, url: str, message: dict) -> dict:
        """POST ``message``; its JSON object answer (each request within JANUS_TIMEOUT_S).

        Raises:
            JanusError: unreachable, no answer in time, an answer that is not a JSON
                object, or a Janus ``error`` (its code in the message; Janus' own
                words only in the log: the URL may be a client's choice).
        """
        assert self.http is not None
        try:
            async with self.http.post(url, json=message, timeout=aiohttp.ClientTimeout(total=JANUS_TIMEOUT_S)) as r:
                data = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise JanusError(f"Janus at {self.root[:80]} unreachable: {str(e)[:160] or type(e).__name__}") from e
        except TimeoutError as e:
            raise JanusError(f"Janus at {self.root[:80]} did not answer within {JANUS_TIMEOUT_S:g} s") from e
        if not isinstance(data, dict):
            raise JanusError(f"{self.root[:80]} answered {type(data).__name__} JSON, not a Janus message")
        if data.get("janus") == "error":
            error = data.get("error")
            log.info("Janus at %s refused %r: %.300r", self.root[:80], message.get("janus"), error)
            code = error.get("code") if isinstance(error, dict) else None
            raise JanusError(f"Janus refused {message.get('janus')!r} (error {str(code)[:12]})")
        return data

    @staticmethod
    def _id(data: dict) -> int:
        """The ``data.id`` of a ``create``/``attach`` answer. Raises JanusError."""
        inner = data.get("data")
        ident = inner.get("id") if isinstance(inner, dict) else None
        if type(ident) is not int:
            raise JanusError("Janus answered without a session or handle id")
        return ident

    async def create(self) -> None:
        """Create the Janus session and start its long poll. Raises JanusError."""
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JANUS_TIMEOUT_S))
        data = await self._post(self.root, {"janus": "create", "transaction": self._transaction()})
        self.url = f"{self.root}/{self._id(data)}"
        self._poll = asyncio.ensure_future(self._long_poll())

    async def attach(self, plugin: str = VIDEOROOM) -> str:
        """Attach ``plugin``; returns the handle's URL. Raises JanusError."""
        data = await self._post(self.url, {"janus": "attach", "plugin": plugin, "transaction": self._transaction()})
        return f"{self.url}/{self._id(data)}"

    async def request(self, handle: str, body: dict, jsep: dict | None = None) -> tuple[dict, dict | None]:
        """A plugin request; returns (plugin data, jsep or None) of its answer, waiting
        for the event when Janus answers asynchronously. Raises JanusError (also for a
        plugin-level ``error`` in the answer)."""
        transaction = self._transaction()
        message: dict[str, Any] = {"janus": "message", "transaction": transaction, "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[transaction] = waiter
        try:
            data = await self._post(handle, message)
            if data.get("janus") == "ack":
                try:
                    data = await asyncio.wait_for(waiter, JANUS_TIMEOUT_S)
                except TimeoutError as e:
                    raise JanusError(f"Janus did not answer {body.get('request')!r} within {JANUS_TIMEOUT_S:g} s") from e
        finally:
            self._waiting.pop(transaction, None)
        plugindata = data.get("plugindata")
        plugin = plugindata.get("data") if isinstance(plugindata, dict) else None
        jsep = data.get("jsep")
        if not isinstance(plugin, dict) or not (jsep is None or isinstance(jsep, dict)):
            raise JanusError(f"Janus answered {body.get('request')!r} without plugin data")
        if "error" in plugin:
            log.info("Janus VideoRoom refused %r: %.300r", body.get("request"), plugin["error"])
            raise JanusError(f"Janus VideoRoom refused {body.get('request')!r} "
                             f"(error_code {str(plugin.get('error_code'))[:12]})")
        return plugin, jsep

    async def _long_poll(self) -> None:
        while not self.closed:
            try:
                async with self.http.get(self.url, params={"maxev": 10, "rid": int(time.time() * 1000)},
                                         timeout=aiohttp.ClientTimeout(total=POLL_S + JANUS_TIMEOUT_S)) as r:
                    events = await r.json(content_type=None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Janus went away: requests waiting on events time out
                log.warning("Janus long poll: %s", str(e)[:160] or type(e).__name__)
                await asyncio.sleep(1.0)
                continue
            for event in events if isinstance(events, list) else [events]:
                transaction = event.get("transaction") if isinstance(event, dict) else None
                waiter = self._waiting.get(transaction) if isinstance(transaction, str) else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)

    async def destroy(self) -> None:
        """Destroy the Janus session (its handles leave their rooms); never raises."""
        if self.closed:
            return
        self.closed = True
        if self._poll is not None:
            self._poll.cancel()
        if self.url is not None and self.http is not None:
            try:
                await self._post(self.url, {"janus": "destroy", "transaction": self._transaction()})
            except JanusError as e:
                log.info("Janus destroy: %s", e)
        if self.http is not None:
            await self.http.close()


async def ensure_room(janus: JanusSession, handle: str, room: int | None) -> tuple[int, bool]:
    """``room`` if it exists, else created (a new random id when None). Opus and VP8,
    the codecs aiortc sends. Returns (room, created by us). Raises JanusError."""
    if room is not None:
        exists, _ = await janus.request(handle, {"request": "exists", "room": room})
        if exists.get("exists") is True:
            return room, False
    room = room if room is not None else secrets.randbelow(2**31) + 1
    await janus.request(handle, {"request": "create", "room": room, "publishers": ROOM_PUBLISHERS,
                                 "audiocodec": "opus", "videocodec": "vp8", "bitrate": 0})
    return room, True


class JanusPublisher:
    """One session published into a VideoRoom: its own pair of tracks (``JoinPoint``),
    one encode, whatever the audience."""

    def __init__(self, session: Any, url: str, ice_servers: list | None = None) -> None:
        self.session = session
        self.janus = JanusSession(url)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers) if ice_servers else None)
        self.room: int | None = None
        self.feed: int | None = None
        self.stopped = False
        self._handle: str | None = None
        self._created_room = False  # ensure_room made self.room: stop() destroys it

    async def start(self, room: int | None) -> None:
        """Publish. Raises JanusError."""
        join = JoinPoint()
        self.pc.addTransceiver(AvatarAudioTrack(self.session.worker, join), direction="sendonly")
        self.pc.addTransceiver(AvatarVideoTrack(self.session.worker, join), direction="sendonly")
        await self.janus.create()
        handle = self._handle = await self.janus.attach()
        self.room, self._created_room = await ensure_room(self.janus, handle, room)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        joined, jsep = await self.janus.request(
            handle,
            {"request": "joinandconfigure", "ptype": "publisher", "room": self.room,
             "display": f"avatar {self.session.id[:8]}", "audio": True, "video": True},
            {"type": "offer", "sdp": self.pc.localDescription.sdp, "trickle": False})
        if jsep is None or jsep.get("type") != "answer":
            raise JanusError(f"Janus sent no answer to the publisher's offer ({str(joined)[:120]})")
        self.feed = joined.get("id")
        connected = asyncio.Event()

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState in ("connected", "failed", "closed"):
                connected.set()

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="answer"))
        # Janus lists a feed (subscribers may join it) only once its media is up.
        try:
            await asyncio.wait_for(connected.wait(), JANUS_TIMEOUT_S)
        except TimeoutError as e:
            raise JanusError(f"no connection to Janus within {JANUS_TIMEOUT_S:g} s (ICE: see docs/deploy.md)") from e
        if self.pc.connectionState != "connected":
            raise JanusError(f"the connection to Janus {self.pc.connectionState} (ICE: see docs/deploy.md)")

    async def stop(self) -> None:
        """Unpublish (idempotent, never raises): a room we created is destroyed unless
        another publisher uses it, the Janus session destroyed, the peer closed."""
        if self.stopped:
            return
        self.stopped = True
        if self._created_room and self._handle is not None and not self.janus.closed:
            try:
                others, _ = await self.janus.request(self._handle, {"request": "listparticipants", "room": self.room})
                participants = others.get("participants")
                if isinstance(participants, list) and all(
                        isinstance(p, dict) and p.get("id") == self.feed for p in participants):
                    await self.janus.request(self._handle, {"request": "destroy", "room": self.room})
            except JanusError as e:
                log.info("Janus room %s not destroyed: %s", self.room, e)
        await self.janus.destroy()
        await self.pc.close()
        for sender in self.pc.getSenders():
            sender.replaceTrack(None)


class JanusSubscriber:
    """A subscriber to a VideoRoom feed on an aiortc peer connection ``pc`` (tests,
    benchmarks): Janus offers, ``pc`` answers, ``start``."""

    def __init__(self, url: str, pc: RTCPeerConnection) -> None:
        self.janus = JanusSession(url)
        self.pc = pc

    async def subscribe(self, room: int, feed: int) -> None:
        await self.janus.create()
        handle = await self.janus.attach()
        _, jsep = await self.janus.request(handle, {"request": "join", "ptype": "subscriber", "room": room,
                                                    "streams": [{"feed": feed}]})
        if jsep is None:
            raise JanusError("Janus sent no offer to the subscriber")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.janus.request(handle, {"request": "start"},
                                 {"type": "answer", "sdp": self.pc.localDescription.sdp, "trickle": False})

    async def close(self) -> None:
        await self.janus.destroy()


class JanusFanout(wish.PerSession[JanusPublisher]):
    """The Janus publications of one server (at most one per session; publishes and
    unpublishes of one session run one at a time, those of closed sessions end:
    ``wish.PerSession``)."""

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.server = server

    async def publish(self, session: Any, url: str, room: int | None) -> JanusPublisher:
        """Publish ``session`` (replacing its publication). Raises JanusError (also
        published as an ``error`` event)."""

        async def begin(pub: JanusPublisher) -> None:
            try:
                await pub.start(room)
            except Exception as e:
                if isinstance(e, JanusError):
                    msg = str(e)
                elif isinstance(e, (KeyError, TypeError, ValueError)):
                    msg = f"unexpected answer from Janus: {type(e).__name__}"
                    log.info("session %s: unexpected answer from Janus: %r", session.id[:8], e)
                else:  # aiortc or aiohttp failing in a way we did not foresee: a 502, not a 500
                    log.exception("session %s: publishing to Janus failed", session.id[:8])
                    msg = f"publishing to Janus failed: {type(e).__name__}"
                session.bus.publish({"type": "error", "msg": msg, "source": "janus"})
                raise JanusError(msg) from e

        pub = await self.replace(session, lambda: JanusPublisher(session, url, self.server.ice_servers), begin)
        log.info("session %s: published to Janus room %s as feed %s", session.id[:8], pub.room, pub.feed)
        return pub

    def ended(self, pub: JanusPublisher) -> bool:
        """A publication whose connection to Janus failed (said on the session's bus)."""
        if pub.pc.connectionState != "failed":
            return False
        pub.session.bus.publish({"type": "error", "msg": "Janus publication: ICE failed", "source": "janus"})
        return True

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /janus {sessionid, room?, url?}`` / ``{sessionid, stop: true}``."""
        body = await read_json(request, self.server.args.request_timeout)
        session = self.server.session(body, request)
        if body.get("stop"):
            return ok(stopped=await self.stop_in_turn(session.id))
        url = body.get("url") or self.server.args.janus_url
        if not url:
            raise HTTPError(400, "no Janus: give 'url' (its HTTP API, e.g. http://127.0.0.1:8088/janus) or start "
                                 "the server with --janus_url")
        check_url(url, ("http", "https"), "Janus' http(s) API URL")
        room = body.get("room")
        if room is not None and (type(room) is not int or not 0 < room <= MAX_ROOM):
            raise HTTPError(400, f"'room' must be a positive integer, got {str(room)[:20]!r}")
        if not session.connected:
            raise HTTPError(409, "the session's peer has not connected yet; publish once it has")
        try:
            pub = await self.publish(session, url, room)
        except JanusError as e:
            raise HTTPError(502, str(e)) from e
        return ok(room=pub.room, feed=pub.feed)


def setup(app: web.Application, server: Any) -> None:
    """Register ``POST /janus``."""
    fanout = JanusFanout(server)
    app.router.add_post("/janus", fanout.handle)
    app.on_shutdown.insert(0, fanout.stop_all)


# -- a loopback Janus for tests and benchmarks -----------------------------------------
JANUS_BIN = "janus"
JANUS_LIBS = Path("/usr/lib/x86_64-linux-gnu/janus")
HOW_TO_GET = "apt-get install janus (Debian; Janus 1.1)"


class JanusProcess:
    """``janus`` with a config folder of its own: the HTTP API on 127.0.0.1 only, the
    VideoRoom plugin only, media ports ``port+1 .. port+200``. Janus (libnice) never
    gathers loopback candidates: its media uses the host's own addresses, so a
    server publishing to it must offer those too (listen beyond loopback, with
    ``--api_key``; see docs/deploy.md).

    Args:
        workdir: where the config folder and the log go.
        port: the HTTP API port.
    Raises:
        RuntimeError: janus is not installed, exited, or did not answer within ``timeout`` s.
    """

    def __init__(self, workdir: Path, port: int, timeout: float = 20.0) -> None:
        binary = shutil.which(JANUS_BIN)
        if binary is None:
            raise RuntimeError(f"janus not found: {HOW_TO_GET}")
        conf = Path(workdir) / "janus-conf"
        conf.mkdir(parents=True, exist_ok=True)
        libs = JANUS_LIBS
        plugins = [p.name for p in (libs / "plugins").glob("*.so") if p.name != "libjanus_videoroom.so"]
        transports = [p.name for p in (libs / "transports").glob("*.so") if p.name != "libjanus_http.so"]
        (conf / "janus.jcfg").write_text(f"""general: {{
  configs_folder = "{conf}"
  plugins_folder = "{libs / 'plugins'}"
  transports_folder = "{libs / 'transports'}"
  events_folder = "{libs / 'events'}"
  loggers_folder = "{libs / 'loggers'}"
  debug_level = 3
}}
media: {{ rtp_port_range = "{port + 1}-{port + 200}" }}
plugins: {{ disable = "{','.join(plugins)}" }}
transports: {{ disable = "{','.join(transports)}" }}
events: {{ broadcast = false }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
""")
        (conf / "janus.transport.http.jcfg").write_text(f"""general: {{
  base_path = "/janus"
  http = true
  port = {port}
  ip = "127.0.0.1"
  https = false
}}
admin: {{ admin_http = false }}
""")
        (conf / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
        self.url = f"http://127.0.0.1:{port}/janus"
        self.log = Path(workdir) / f"janus-{port}.log"
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([binary, "-F", str(conf), "-C", str(conf / "janus.jcfg"), "-o"],
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"janus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/info", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)  # polling a subprocess until it listens
        self.stop()
        raise RuntimeError(f"janus did not answer on {self.url}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()
