"""The front of workers mode (issue #10): page, signalling and routing; no media.

Every session lives in one worker (``workers.py``). The front serves the page and
its static files itself, places a new session (``POST /offer``, ``POST /whep``
without a session id) on the worker with the most free capacity (503 at once when
every worker is full) and relays the worker's answer, whose SDP carries the
worker's own ICE candidates: media then flows between the client and the worker.
Every later request for a session is relayed to the worker that holds it: the
session id is found in the query (``?sessionid=``), in the path
(``/whep/<id>``, ``/whip/<id>``, ``/stream/<id>.mp4``, ``/record/<id>``) or in the
body (JSON or multipart ``sessionid``). Responses are streamed back (SSE, fMP4),
WebSockets are relayed both ways. A session whose worker was lost answers 410
Gone with a message; an unknown one 404, as in single-process mode.

``GET /metrics`` holds the front's own series (workers, placements, sessions lost
with their worker) followed by every live worker's series, each labelled with
``worker``; ``GET /status`` gathers the workers' status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Optional

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from api import HTTPError, error_middleware
from security import AccessControl
from server import WEB_DIR
from workers import FORWARDED_HEADER, SECRET_HEADER, Worker, WorkerPool

log = logging.getLogger("front")

# Paths whose first segment after the route names the session.
SESSION_PATH = re.compile(r"^/(?:whep|whip|stream|record)/([A-Za-z0-9_-]{1,64})(?:[./]|$)")
# Requests that open a new session: placed on a worker.
NEW_SESSION = {("POST", "/offer"), ("POST", "/whep")}
# Responses relayed as a stream (no total time limit): events, media, downloads.
STREAMING = re.compile(r"^/(?:events|sse|stream/|record/)")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}  # Host is kept: the worker checks Origin against it
LOST_MEMORY = 10_000  # sessions of lost workers remembered for their 410 (oldest forgotten first)
SESSION_ID_LIMIT = 64  # characters


class Front:
    """Routes requests to the session workers of a :class:`workers.WorkerPool`."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.access = AccessControl(args.api_key, args.cors_origin)
        self.pool = WorkerPool(args, self._on_lost)
        self.lost: OrderedDict[str, str] = OrderedDict()  # session id -> why it is gone
        self.http: Optional[aiohttp.ClientSession] = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_workers = Gauge("avatar_workers", "Session workers ready", registry=r)
        self.m_lost = Counter("avatar_workers_lost", "Session workers lost (died or stopped answering)", registry=r)
        self.m_sessions_lost = Counter("avatar_sessions_lost", "Sessions gone with their worker", registry=r)
        self.m_refused = Counter("avatar_offers_refused", "New sessions refused: every worker full", registry=r)
        self.m_placed = Counter("avatar_sessions_placed", "Sessions placed on a worker", ["worker"], registry=r)

    # -- life cycle -----------------------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=2.0))
        await self.pool.start()
        log.info("front: %d session workers ready", len(self.pool.live()))

    async def on_shutdown(self, app: web.Application) -> None:
        await self.pool.stop()
        if self.http is not None:
            await self.http.close()

    def _on_lost(self, worker: Worker, sessions: set[str]) -> None:
        self.m_lost.inc()
        self.m_sessions_lost.inc(len(sessions))
        for sid in sessions:
            self.lost[sid] = f"its worker (process {worker.pid}) was lost"
        while len(self.lost) > LOST_MEMORY:
            self.lost.popitem(last=False)

    # -- routing --------------------------------------------------------------------------------
    async def route(self, request: web.Request) -> web.StreamResponse:
        """Any API request: place a new session or relay to the session's worker."""
        try:
            body = await asyncio.wait_for(request.read(), self.args.request_timeout) if request.can_read_body else b""
        except asyncio.TimeoutError as e:
            raise HTTPError(408, f"the request body did not arrive within {self.args.request_timeout:g} s") from e
        if (request.method, request.path.rstrip("/") or "/") in NEW_SESSION:
            return await self._place(request, body)
        sid = self._session_id(request, body)
        if sid is None:
            # Session-independent routes (/config, /avatars, /voices, ...): any worker answers.
            live = self.pool.live()
            if not live:
                raise HTTPError(503, "no session worker is running")
            return await self._relay(request, body, live[0])
        worker = self.pool.holding(sid)
        if worker is None:
            if sid in self.lost:
                raise HTTPError(410, f"session '{sid[:40]}' is gone: {self.lost[sid]}; start a new session")
            raise HTTPError(404, f"unknown session '{sid[:40]}'")
        return await self._relay(request, body, worker)

    async def _place(self, request: web.Request, body: bytes) -> web.StreamResponse:
        worker = self.pool.pick()
        if worker is None:
            self.m_refused.inc()
            raise HTTPError(503, f"all {len(self.pool.live())} session workers are full "
                                 f"({self.pool.capacity} sessions each); try again later")
        worker.reserved += 1  # hold the place while the worker answers
        try:
            response = await self._relay(request, body, worker, capture=True)
        finally:
            worker.reserved -= 1
        sid = self._answered_session(response)
        if sid is not None:
            self.pool.placed(worker, sid)
            self.m_placed.labels(str(worker.index)).inc()
        return response

    @staticmethod
    def _answered_session(response: web.StreamResponse) -> Optional[str]:
        """The new session's id from an offer's JSON answer or a WHEP ``Location``."""
        if response.status >= 300 or not isinstance(response, web.Response):
            return None
        location = response.headers.get("Location", "")
        m = SESSION_PATH.match(location)
        if m:
            return m.group(1)
        try:
            sid = json.loads(response.body or b"{}").get("sessionid")  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            return None
        return sid if isinstance(sid, str) else None

    @staticmethod
    def _session_id(request: web.Request, body: bytes) -> Optional[str]:
        """The session a request names, from its query, path or body (None: none)."""
        sid = request.query.get("sessionid")
        if sid:
            return sid[:SESSION_ID_LIMIT]
        m = SESSION_PATH.match(request.path)
        if m:
            return m.group(1)
        if not body:
            return None
        ctype = request.content_type
        if ctype == "application/json":
            try:
                value = json.loads(body).get("sessionid")
            except (ValueError, AttributeError, RecursionError):
                return None  # the worker answers the bad body with its own 400
            return str(value)[:SESSION_ID_LIMIT] if value not in (None, "") else None
        if ctype.startswith("multipart/"):
            head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode("latin-1", "replace")
            message = BytesParser(policy=HTTP).parsebytes(head + body)
            if message.is_multipart():
                for part in message.iter_parts():
                    if part.get_param("name", header="content-disposition") == "sessionid":
                        value = part.get_payload(decode=True) or b""
                        return value.decode("utf-8", "replace").strip()[:SESSION_ID_LIMIT] or None
        return None

    # -- relaying -------------------------------------------------------------------------------
    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
                   and k.lower() not in (SECRET_HEADER.lower(), FORWARDED_HEADER.lower())}
        headers[SECRET_HEADER] = self.pool.secret
        headers[FORWARDED_HEADER] = request.remote or "?"
        return headers

    async def _relay(self, request: web.Request, body: bytes, worker: Worker,
                     capture: bool = False) -> web.StreamResponse:
        """Relay ``request`` to ``worker``; cut short (410) if the worker is lost meanwhile
        (a hung worker never answers on its own)."""
        started: list[web.StreamResponse] = []  # a response already sent to the client
        if request.headers.get("Upgrade", "").lower() == "websocket":
            work = self._relay_websocket(request, worker, started)
        else:
            work = self._relay_http(request, body, worker, started, capture)
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(worker.gone.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled() or not task.done():
            if started:  # a stream or socket in progress simply ends
                return started[0]
            raise HTTPError(410, f"the session's worker (process {worker.pid}) was lost; start a new session")
        return task.result()

    async def _relay_http(self, request: web.Request, body: bytes, worker: Worker,
                          started: list, capture: bool = False) -> web.StreamResponse:
        assert self.http is not None
        streaming = bool(STREAMING.match(request.path)) and not capture
        timeout = aiohttp.ClientTimeout(total=None if streaming else self.args.request_timeout + 20, sock_connect=2.0)
        try:
            upstream = await self.http.request(request.method, worker.url + request.path_qs, data=body or None,
                                               headers=self._headers(request), timeout=timeout,
                                               allow_redirects=False)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if isinstance(e, aiohttp.ClientConnectorError):  # refused: its process is gone
                self.pool.lose(worker, f"unreachable: {type(e).__name__}")
            raise HTTPError(410 if worker.lost else 504, f"the session's worker did not answer ({type(e).__name__})") from e
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            if not streaming:
                data = await upstream.read()
                return web.Response(status=upstream.status, headers=headers, body=data)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            started.append(response)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            if started:  # the worker went mid-stream: the stream ends there
                return started[0]
            raise HTTPError(410 if worker.lost else 502, f"the session's worker broke off ({type(e).__name__})") from e
        finally:
            upstream.release()

    async def _relay_websocket(self, request: web.Request, worker: Worker, started: list) -> web.StreamResponse:
        assert self.http is not None
        headers = {k: v for k, v in self._headers(request).items() if not k.lower().startswith("sec-websocket")}
        try:
            upstream = await self.http.ws_connect(worker.url + request.path_qs, headers=headers,
                                                  timeout=aiohttp.ClientWSTimeout(ws_close=2.0), max_msg_size=8 << 20)
        except aiohttp.WSServerHandshakeError as e:
            raise HTTPError(e.status if 400 <= e.status < 500 else 502, e.message or "refused by the session's worker") from e
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise HTTPError(410 if worker.lost else 504, f"the session's worker did not answer ({type(e).__name__})") from e
        ws = web.WebSocketResponse(max_msg_size=8 << 20)
        await ws.prepare(request)
        started.append(ws)

        async def pump(source, sink) -> None:
            async for msg in source:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                else:
                    break

        tasks = [asyncio.ensure_future(pump(ws, upstream)), asyncio.ensure_future(pump(upstream, ws))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await upstream.close()
            await ws.close()
        return ws

    # -- the front's own routes ------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def status(self, request: web.Request) -> web.Response:
        """The front's view plus each live worker's ``/status``; ``sessions`` gathers the
        workers' sessions in single-process mode's shape."""
        async def one(w: Worker) -> tuple[Worker, Any]:
            try:
                assert self.http is not None
                async with self.http.get(w.url + "/status", headers={SECRET_HEADER: self.pool.secret},
                                         timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    return w, await r.json()
            except Exception as e:
                return w, {"error": type(e).__name__}

        answers = await asyncio.gather(*(one(w) for w in self.pool.live()))
        sessions: dict[str, Any] = {}  # every worker's, as single-process mode lists them
        for _, st in answers:
            sessions.update(st.get("sessions") or {})
        return web.json_response({
            "mode": "workers",
            "sessions": sessions,
            "sessions_per_worker": self.pool.capacity,
            "workers_lost": int(self.m_lost._value.get()),
            "restarts": self.pool.restarts,
            "workers": [{"index": w.index, "pid": w.pid, "node_id": w.node_id, "url": w.url,
                         "sessions": sorted(s[:8] for s in w.sessions), "status": st} for w, st in answers],
            "starting": sum(1 for w in self.pool.workers if not w.ready),
        })

    async def metrics(self, request: web.Request) -> web.Response:
        """The front's series, then every live worker's, labelled ``worker="<index>"``."""
        self.m_workers.set(len(self.pool.live()))
        parts = [generate_latest(self.registry).decode()]

        async def one(w: Worker) -> str:
            try:
                assert self.http is not None
                async with self.http.get(w.url + "/metrics", headers={SECRET_HEADER: self.pool.secret},
                                         timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    return label_samples(await r.text(), "worker", str(w.index))
            except Exception:
                return ""

        parts += await asyncio.gather(*(one(w) for w in self.pool.live()))
        return web.Response(text=merge_exposition(parts), content_type="text/plain", charset="utf-8")


def label_samples(text: str, name: str, value: str) -> str:
    """Prometheus text with ``name="value"`` added to every sample line."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        metric, _, rest = line.partition(" ")
        if "{" in metric:
            metric = metric.replace("{", f'{{{name}="{value}",', 1)
        else:
            metric = f'{metric}{{{name}="{value}"}}'
        out.append(f"{metric} {rest}")
    return "\n".join(out)


def merge_exposition(parts: list[str]) -> str:
    """Concatenate Prometheus text blocks keeping one ``# HELP``/``# TYPE`` per family
    and each family's samples together (the format requires it)."""
    families: OrderedDict[str, list[str]] = OrderedDict()
    current = None
    for text in parts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split(" ", 3)[2]
                lines = families.setdefault(current, [])
                if line not in lines:
                    lines.insert(sum(1 for x in lines if x.startswith("#")), line)
                continue
            if line.startswith("#"):
                continue
            families.setdefault(current or line.split("{")[0].split(" ")[0], []).append(line)
    return "\n".join(line for lines in families.values() for line in lines) + "\n"


FRONT = web.AppKey("front", Front)


def build_front_app(args: Any) -> web.Application:
    """The workers-mode application: the page and static files here, everything
    else relayed to the session workers."""
    front = Front(args)
    app = web.Application(middlewares=[error_middleware, front.access.middleware],
                          client_max_size=int(args.max_upload_mb * 1024 * 1024) + 65536)
    app[FRONT] = front
    app.router.add_get("/", front.index)
    app.router.add_static("/web/", WEB_DIR)
    app.router.add_get("/status", front.status)
    app.router.add_get("/metrics", front.metrics)
    app.router.add_route("*", "/{tail:.*}", front.route)
    app.on_startup.append(front.on_startup)
    app.on_shutdown.append(front.on_shutdown)
    return app
