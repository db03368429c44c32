"""Session workers as Ray actors (issue #10): one server front, many worker processes.

In workers mode (``--workers N`` or ``--ray_address``) the front (``front.py``) holds
no media. Each :class:`SessionWorker` is a Ray async actor: its own process and
event loop running this project's whole session host (``app.build_app``: peer
connections, worker threads, tracks, model) behind an HTTP port that only the front
calls (every request must carry the pool's secret). Media flows between the client
and the worker's node directly: the worker's aiortc gathers its node's ICE
candidates, so its SDP answer, relayed by the front, points the client there.

:class:`WorkerPool` starts the actors (Ray places them by the resources each asks
for: ``--worker_cpus``, ``--worker_gpus``), polls each one every
:data:`POLL_S` for its sessions, and declares a worker lost when a poll fails (the
process died: Ray raises ``RayActorError``) or does not answer within
:data:`POLL_TIMEOUT_S` (it hangs). A lost worker's sessions are reported gone
(the front answers 410) and a replacement is started; the other workers are not
touched. Ray is imported only here and only in workers mode, so single-process
mode (``--workers 0``, the default) starts no Ray at all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("workers")

ROOT = Path(__file__).resolve().parent
POLL_S = 0.5  # how often each worker is asked for its sessions (s)
# A worker that does not answer a poll within this long is lost (s). Poll period +
# timeout = 1.5 s: a dead or hung worker is noticed within the 2 s.
POLL_TIMEOUT_S = 1.0
START_TIMEOUT_S = 120.0  # a worker's start-up (imports, avatar, TTS) limit once placed (s)
SECRET_HEADER = "X-Avatar-Worker-Secret"
FORWARDED_HEADER = "X-Forwarded-For"
# Ray's object store is unused here (requests are small); its minimum, so that a
# local Ray instance stays light (Ray refuses less than ~75 MiB).
OBJECT_STORE_BYTES = 80 * 1024 * 1024


def add_arguments(parser) -> None:
    """The workers-mode options (read by :class:`WorkerPool` and ``front.py``)."""
    g = parser.add_argument_group("workers (sessions in Ray actors; issue #10)")
    g.add_argument("--workers", type=int, default=0,
                   help="session worker processes (Ray actors) behind this front; 0: sessions in this process")
    g.add_argument("--ray_address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting "
                   "a local Ray instance; implies workers mode")
    g.add_argument("--worker_cpus", type=float, default=1.0, help="CPUs each worker reserves in Ray (fractional allowed)")
    g.add_argument("--worker_gpus", type=float, default=0.0, help="GPUs each worker reserves in Ray (fractional allowed)")
    g.add_argument("--worker_resources", default="", metavar="NAME=N[,NAME=N]",
                   help="custom Ray resources each worker reserves (e.g. avatar_slot=1)")
    g.add_argument("--sessions_per_worker", type=int, default=4, help="sessions one worker holds at most")


def parse_resources(spec: str) -> dict[str, float]:
    """``"a=1,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}``. Raises ValueError on a bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--worker_resources: expected NAME=N, got {item!r}")
        out[name] = float(value)
    return out


# -- the worker side --------------------------------------------------------------------
def front_only(secret: str) -> Callable:
    """aiohttp middleware for a worker's app: only the front may call it.

    A request without the pool's secret gets 403. The client's address, which the
    front passes in ``X-Forwarded-For``, becomes ``request.remote``, so per-address
    limits apply to clients, not to the front.
    """
    from aiohttp import web

    from security import same

    @web.middleware
    async def middleware(request: web.Request, handler):
        if not same(secret, request.headers.get(SECRET_HEADER)):
            raise web.HTTPForbidden(text="this is a session worker; talk to the front")
        forwarded = request.headers.get(FORWARDED_HEADER)
        if forwarded:
            request = request.clone(remote=forwarded.split(",")[0].strip()[:64])
        return await handler(request)

    return middleware


class SessionWorker:
    """The body of a Ray actor (decorated by :func:`_actor_class`): one session host.

    Each method runs on the actor's event loop; the HTTP server runs on it too.
    """

    def __init__(self) -> None:
        self._runner = None
        self._server = None
        self.index = -1

    async def start(self, args: Any, secret: str, index: int) -> dict:
        """Serve ``args``' session host on an ephemeral port.

        Returns ``{"url", "pid", "node_id"}``: where the front reaches it, its
        process id, and its Ray node. Raises what ``app.build_app`` raises.
        """
        from aiohttp import web

        import app
        from webrtc import use_loopback_ice

        import ray

        self.index = index
        logging.basicConfig(level=str(args.log_level).upper(),
                            format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
        loopback = app.is_loopback(args.listen)
        if loopback:
            use_loopback_ice()
        application = app.build_app(args)
        application.middlewares.insert(0, front_only(secret))
        self._server = application[app.SERVER]
        self._runner = web.AppRunner(application, keepalive_timeout=args.request_timeout)
        await self._runner.setup()
        host = "127.0.0.1" if loopback else args.listen
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        advertised = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        log.info("worker %d (pid %d) serving sessions on %s:%d", index, os.getpid(), advertised, port)
        return {"url": f"http://{advertised}:{port}", "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def poll(self) -> dict:
        """The worker's open sessions: ``{"sessions": [id, ...]}``."""
        registry = self._server.registry if self._server is not None else None
        return {"sessions": list(registry.sessions) if registry is not None else []}

    async def stop(self) -> None:
        """Close every session and the HTTP server (a graceful shutdown)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


_ACTOR = None


def _actor_class():
    """``ray.remote(SessionWorker)``, made once (importing Ray only in workers mode)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        # One concurrent call per kind is plenty; polls must never queue behind a
        # long call, so allow a few.
        _ACTOR = ray.remote(max_concurrency=8)(SessionWorker)
    return _ACTOR


# -- the front side -----------------------------------------------------------------------
@dataclass(eq=False)
class Worker:
    """The front's view of one worker actor."""

    index: int
    actor: Any
    url: str = ""
    pid: int = 0
    node_id: str = ""
    ready: bool = False
    lost: bool = False
    sessions: set[str] = field(default_factory=set)
    placed_at: dict[str, float] = field(default_factory=dict)  # sessions placed since the last poll
    reserved: int = 0  # offers being answered by it right now
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when the worker is lost

    @property
    def load(self) -> int:
        """Places taken: its sessions (as last polled, plus those placed since) and
        the offers it is answering."""
        return len(self.sessions) + self.reserved


class WorkerPool:
    """The front's Ray actors: start, place, poll, replace.

    Args:
        args: the server options (``--workers`` etc.; each worker gets a copy with
            ``--workers 0`` and ``--max_session`` = ``--sessions_per_worker``).
        on_lost: called with ``(worker, session_ids)`` when a worker is lost.
    """

    def __init__(self, args: Any, on_lost: Callable[[Worker, set[str]], None]) -> None:
        self.args = args
        self.on_lost = on_lost
        self.secret = secrets.token_urlsafe(24)
        self.capacity = max(1, int(args.sessions_per_worker))
        self.workers: list[Worker] = []
        self.restarts = 0
        self._next_index = 0
        self._tasks: set[asyncio.Task] = set()
        self._worker_args = self._args_for_worker(args)
        self._resources = parse_resources(args.worker_resources)

    @staticmethod
    def _args_for_worker(args: Any) -> Any:
        import argparse

        wargs = argparse.Namespace(**vars(args))
        wargs.workers = 0
        wargs.ray_address = None
        wargs.max_session = max(1, int(args.sessions_per_worker))
        return wargs

    # -- life cycle ------------------------------------------------------------------------
    def init_ray(self) -> None:
        """Join ``--ray_address``, or start a light local Ray instance (no dashboard,
        the smallest object store, logical CPUs for ``--workers`` actors)."""
        import ray

        if ray.is_initialized():
            return
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
        if self.args.ray_address:
            ray.init(address=self.args.ray_address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, int(self.args.workers * max(self.args.worker_cpus, 0.01) + 0.999)),
                     num_gpus=int(self.args.workers * self.args.worker_gpus + 0.999) or None,
                     resources={k: v * self.args.workers for k, v in self._resources.items()} or None,
                     include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     runtime_env=env, log_to_driver=False, configure_logging=False)

    async def start(self) -> None:
        """Start ``--workers`` actors (at least one with ``--ray_address``) and wait
        for those Ray can place; the rest keep starting in the background."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.init_ray)
        count = self.args.workers or 1
        starting = [self._spawn() for _ in range(count)]
        await asyncio.wait(starting, timeout=START_TIMEOUT_S)
        if not any(w.ready for w in self.workers):
            raise RuntimeError("no session worker could be started (see the log); check --worker_cpus/--worker_gpus "
                               "against the Ray cluster's resources")
        self._background(self._watch())

    def _spawn(self) -> asyncio.Task:
        opts: dict[str, Any] = {"num_cpus": self.args.worker_cpus, "num_gpus": self.args.worker_gpus}
        if self._resources:
            opts["resources"] = self._resources
        actor = _actor_class().options(**opts).remote()
        worker = Worker(self._next_index, actor)
        self._next_index += 1
        self.workers.append(worker)
        task = asyncio.ensure_future(self._await_start(worker))
        self._background(task)
        return task

    async def _await_start(self, worker: Worker) -> None:
        try:
            info = await worker.actor.start.remote(self._worker_args, self.secret, worker.index)
        except Exception as e:
            log.error("worker %d failed to start: %s", worker.index, str(e)[:500])
            worker.lost = True
            self.workers.remove(worker)
            return
        worker.url, worker.pid, worker.node_id = info["url"], info["pid"], info["node_id"]
        worker.ready = True
        log.info("worker %d ready at %s (pid %d)", worker.index, worker.url, worker.pid)

    async def stop(self) -> None:
        """Stop every worker (their sessions close) and leave Ray."""
        import ray

        for task in list(self._tasks):
            task.cancel()
        live = [w for w in self.workers if w.ready and not w.lost]
        if live:
            await asyncio.wait([asyncio.ensure_future(self._stop_one(w)) for w in live], timeout=10)
        for w in self.workers:
            ray.kill(w.actor, no_restart=True)
        self.workers.clear()
        if not self.args.ray_address:
            await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)

    @staticmethod
    async def _stop_one(worker: Worker) -> None:
        try:
            await worker.actor.stop.remote()
        except Exception:
            pass

    def _background(self, coro_or_task) -> None:
        task = asyncio.ensure_future(coro_or_task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- placement ----------------------------------------------------------------------------
    def live(self) -> list[Worker]:
        """Workers ready for requests."""
        return [w for w in self.workers if w.ready and not w.lost]

    def pick(self) -> Optional[Worker]:
        """The live worker with the most free capacity; None when all are full."""
        free = [(self.capacity - w.load, -w.index, w) for w in self.live() if w.load < self.capacity]
        return max(free, key=lambda t: t[:2])[2] if free else None

    def holding(self, session_id: str) -> Optional[Worker]:
        """The live worker that holds ``session_id`` (None: no live worker does)."""
        return next((w for w in self.live() if session_id in w.sessions), None)

    def placed(self, worker: Worker, session_id: str) -> None:
        """The front placed ``session_id`` on ``worker`` (counted until polls confirm it)."""
        worker.sessions.add(session_id)
        worker.placed_at[session_id] = time.monotonic()

    # -- health -------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            live = self.live()
            if live:
                await asyncio.gather(*(self._poll(w) for w in live))

    async def _poll(self, worker: Worker) -> None:
        try:
            info = await asyncio.wait_for(worker.actor.poll.remote(), POLL_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError (the process died), timeout (it hangs), ...
            reason = "stopped answering" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            self.lose(worker, reason)
            return
        now = time.monotonic()
        # Sessions the front placed moments ago may not be in the worker's answer yet.
        recent = {s for s, t in worker.placed_at.items() if now - t < 2 * POLL_S + POLL_TIMEOUT_S}
        worker.placed_at = {s: worker.placed_at[s] for s in recent}
        worker.sessions = set(info["sessions"]) | recent

    def lose(self, worker: Worker, reason: str) -> None:
        """Declare ``worker`` lost: report its sessions, kill it, start a replacement."""
        import ray

        if worker.lost:
            return
        worker.lost = True
        worker.gone.set()  # requests in flight to it answer 410 now
        log.error("worker %d (pid %d) lost (%s): %d sessions gone", worker.index, worker.pid, reason, len(worker.sessions))
        gone, worker.sessions = set(worker.sessions), set()
        if worker in self.workers:
            self.workers.remove(worker)
        try:
            ray.kill(worker.actor, no_restart=True)  # a hung one too: free its resources
        except Exception:
            pass
        self.on_lost(worker, gone)
        self.restarts += 1
        self._spawn()
