"""Recording a session: ``POST /record`` and ``GET /record/<sessionid>``.

- ``POST /record {sessionid, type: "start_record"}`` (LiveTalking's shape) starts an MP4
  of what the session sends from its next slot on: a :class:`muxer.SlotFollower` (the
  units the WebRTC tracks send, on the session clock) into a :class:`muxer.MP4Muxer`
  writing a file, in the recording's own thread. 409 if one is already running.
- ``POST /record {sessionid, type: "end_record"}`` ends it at the slot being sent now
  and answers once the file is complete: ``{duration_s, bytes, url}``. 409 if none runs;
  503 if the recording's thread did not finish within ``END_TIMEOUT_S`` (it is aborted).
- ``GET /record/<sessionid>`` downloads the session's last finished recording
  (``video/mp4``; ranges allowed); 404 with a message when there is none.

Bounds: a recording longer than ``--record_max_seconds`` or bigger than
``--record_max_mb`` is ended there (the file is kept and complete) with an ``error``
event on the session's events. A write error (full disk, a missing or read-only
``--record_dir``) ends the recording with an ``error`` event and removes the partial
file; the session and its stream go on untouched.

Files (``--record_dir``, default ``data/recordings``; ``rec-<session>-<n>.mp4``): a
session keeps only its last finished recording (a newer one replaces it once it is
finished; downloading does not delete it, so it can be fetched again); all of a
session's files are removed when the session closes, and any left at shutdown. Disk
use is therefore at most ``--max_session`` x 2 x ``--record_max_mb``.

The files are fragmented MP4 like the live stream: a recording cut short by a crash
still plays up to its last fragment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from api import HTTPError, ok, read_json
from clock import FRAME_MS
from muxer import MP4Muxer, SlotFollower

if TYPE_CHECKING:
    from sessions import Session

log = logging.getLogger(__name__)

END_TIMEOUT_S = 10.0  # end_record waits this long for the file to be complete


class RecordingTooLarge(Exception):
    """The file reached its size bound."""


class _BoundedFile:
    """A binary file that refuses to grow beyond ``max_bytes`` (PyAV's sink)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._f = open(path, "wb")
        self.max_bytes = max_bytes
        self.written = 0

    def write(self, data) -> int:
        if self.written + len(data) > self.max_bytes:
            raise RecordingTooLarge(f"recording reached --record_max_mb ({self.max_bytes / 2**20:g} MB)")
        n = self._f.write(data)
        self.written += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class Recording:
    """One recording of a session into ``path``, muxed in its own thread.

    Args:
        session: the session (its ``worker.playout``, ``worker.clock``, ``bus``).
        path: the MP4 file to write.
        max_seconds: longest recording (s).
        max_bytes: biggest file (bytes); the muxer stops before writing beyond it.

    Attributes:
        done: a future resolved (by the thread) with None, or the error message of a
            recording that ended on an error.
        duration: seconds of media written; ``bytes``: the file's size.
        ok: the file is complete and playable (also after a bound was reached).
    """

    def __init__(self, session: "Session", path: Path, max_seconds: float, max_bytes: int) -> None:
        self.session = session
        self.path = path
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self.duration = 0.0
        self.bytes = 0
        self.ok = False
        self.removed = False  # a failed recording's file is gone (or was never made)
        self._stop = threading.Event()
        self._end_slot: int | None = None
        playout = session.worker.playout
        self._follower = SlotFollower(playout, self._stop, end_slot=lambda: self._end_slot)
        self._thread = threading.Thread(target=self._run, name=f"record-{session.id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def end(self) -> None:
        """End at the slot being sent now (it is included): call on the loop."""
        clock = self.session.worker.clock
        if clock.started:
            self._end_slot = max(clock.current_slot() + 1, self._follower.start)
        else:
            self._stop.set()

    def abort(self) -> None:
        """End at once (session teardown)."""
        self._stop.set()

    def _error(self, msg: str) -> str:
        self.session.bus.publish({"type": "error", "msg": msg})
        return msg

    def _run(self) -> None:
        error: str | None = "recording failed (logged on the server)"
        try:
            error = self._record()
        except Exception:  # a bug of ours: logged, and end_record is never left waiting
            log.exception("recording of %s failed", self.session.id[:8])
            self.ok = False
        finally:
            self.done.set_result(error)

    def _record(self) -> str | None:
        """Record until the end slot, a stop, a bound or an error; returns the error
        message (also published as an ``error`` event), None when all went well."""
        error: str | None = None
        sink = muxer = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # here, not on the loop
            sink = _BoundedFile(self.path, self.max_bytes)
            muxer = MP4Muxer(sink)
            for slot, unit, audible in self._follower:
                muxer.add(slot, unit, audible)
                if muxer.duration >= self.max_seconds:
                    error = self._error(f"recording stopped: it reached --record_max_seconds ({self.max_seconds:g} s)")
                    break
            muxer.close()
            self.ok = muxer.frames > 0
            if not self.ok:
                error = "the recording ended before the session sent any media"
        except RecordingTooLarge as e:
            error = self._error(f"recording stopped: {e}")
            self.ok = self._finish_within_bound(muxer)
        except (OSError, ValueError) as e:  # ValueError: PyAV's errors for a failed write are FFmpegError(ValueError)
            error = self._error(f"recording failed: {type(e).__name__}: {e}")
        except Exception as e:
            log.exception("recording of %s failed", self.session.id[:8])
            error = self._error(f"recording failed: {type(e).__name__}")
        finally:
            if muxer is not None:
                self.duration = muxer.duration
                if not self.ok:
                    try:
                        muxer.close()
                    except Exception:
                        pass
            if sink is not None:
                self.bytes = sink.written
                try:
                    sink.close()
                except OSError as e:
                    error = error or self._error(f"recording failed: {e}")
                    self.ok = False
            if not self.ok:
                try:
                    self.path.unlink(missing_ok=True)
                    self.removed = True
                except OSError:  # e.g. the folder is not one: the session's clean-up tries again
                    pass
        return error

    @staticmethod
    def _finish_within_bound(muxer: MP4Muxer | None) -> bool:
        """After the size bound: the fragments written so far make a playable file
        (fragmented MP4), but the trailer cannot be added; close without writing."""
        if muxer is None:
            return False
        try:
            muxer.close()
        except Exception:
            pass
        return True


@dataclass
class _SessionRecords:
    active: Recording | None = None
    last: Recording | None = None  # the last finished, playable recording
    count: int = 0
    files: set[Path] = field(default_factory=set)


class Recorder:
    """Recordings of every session, their routes and their files.

    Args:
        server: the AvatarServer (``session``, ``args.record_dir``,
            ``args.record_max_seconds``, ``args.record_max_mb``, ``args.request_timeout``).
    """

    def __init__(self, server) -> None:
        self.server = server
        args = server.args
        self.dir = Path(getattr(args, "record_dir", "data/recordings"))
        self.max_seconds = float(getattr(args, "record_max_seconds", 600.0))
        self.max_bytes = int(float(getattr(args, "record_max_mb", 200.0)) * 1024 * 1024)
        self.sessions: dict[str, _SessionRecords] = {}
        self._tasks: set[asyncio.Task] = set()

    async def control(self, request: web.Request) -> web.Response:
        body = await read_json(request, self.server.args.request_timeout)
        session = self.server.session(body, request)
        kind = body.get("type")
        if kind == "start_record":
            return await self._start(session)
        if kind == "end_record":
            return await self._end(session)
        raise HTTPError(400, f"'type' must be 'start_record' or 'end_record', got {str(kind)[:20]!r}")

    async def _start(self, session: "Session") -> web.Response:
        records = self.sessions.get(session.id)
        if records is None:
            records = self.sessions[session.id] = _SessionRecords()
            self._background(self._clean_up_after(session))
        if records.active is not None and not records.active.done.done():
            raise HTTPError(409, "this session is already recording; send 'end_record' first")
        records.count += 1
        path = self.dir / f"rec-{session.id}-{records.count}.mp4"
        loop = asyncio.get_running_loop()
        # No await from the check above to here: a parallel start_record sees this one.
        recording = Recording(session, path, self.max_seconds, self.max_bytes)  # its thread makes the folder
        records.active = recording
        records.files.add(path)
        recording.done.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._finished, session.id, recording))
        recording.start()
        return ok(file=path.name, max_seconds=self.max_seconds)

    async def _end(self, session: "Session") -> web.Response:
        records = self.sessions.get(session.id)
        recording = records.active if records is not None else None
        if recording is None:
            raise HTTPError(409, "this session is not recording; send 'start_record' first")
        recording.end()
        try:
            error = await asyncio.wait_for(asyncio.wrap_future(recording.done), END_TIMEOUT_S)
        except TimeoutError:
            recording.abort()
            raise HTTPError(503, f"the recording did not finish within {END_TIMEOUT_S:g} s; it was aborted") from None
        if not recording.ok:
            raise HTTPError(409, f"the recording ended without a file: {error}")
        return ok(duration_s=round(recording.duration, 3), bytes=recording.bytes, url=f"/record/{session.id}",
                  **({"warning": error} if error else {}))

    def _finished(self, sid: str, recording: Recording) -> None:
        """On the loop, when a recording's thread is done: it becomes the session's last
        recording (the previous file is removed) or, failed, its file is forgotten."""
        records = self.sessions.get(sid)
        if records is None:
            return
        if records.active is recording:
            records.active = None
        if recording.ok:
            previous, records.last = records.last, recording
            if previous is not None:
                self._remove([previous.path])
                records.files.discard(previous.path)
        elif recording.removed:  # a file its thread could not remove stays listed for the clean-up
            records.files.discard(recording.path)

    async def download(self, request: web.Request) -> web.StreamResponse:
        session = self.server.session({"sessionid": request.match_info["sessionid"]}, request)
        records = self.sessions.get(session.id)
        if records is None or records.last is None:
            raise HTTPError(404, "this session has no finished recording ('start_record', then 'end_record')")
        path = records.last.path
        return web.FileResponse(path, headers={"Content-Type": "video/mp4",
                                               "Content-Disposition": f'attachment; filename="{path.name}"'})

    # -- files -------------------------------------------------------------------------
    async def _clean_up_after(self, session: "Session") -> None:
        """Wait for the session's end (its event bus closes), then stop its recording
        and remove its files."""
        async for _ in session.bus.subscribe():
            pass
        await self._drop(session.id)

    async def _drop(self, sid: str) -> None:
        """Stop a session's recording and remove its files; forgets the session last, so
        that a drop cut short (shutdown) is finished by :meth:`on_cleanup`."""
        records = self.sessions.get(sid)
        if records is None:
            return
        if records.active is not None:
            records.active.abort()
            try:
                await asyncio.wait_for(asyncio.wrap_future(records.active.done), END_TIMEOUT_S)
            except TimeoutError:
                log.warning("recording of %s did not stop within %g s", sid[:8], END_TIMEOUT_S)
        await asyncio.get_running_loop().run_in_executor(None, self._remove, list(records.files))
        self.sessions.pop(sid, None)

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove recording %s: %s", path, e)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_cleanup(self, app: web.Application) -> None:
        """At shutdown (after the sessions closed): stop every recording, remove every file."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=END_TIMEOUT_S)
        for sid in list(self.sessions):
            await self._drop(sid)


def setup(app: web.Application, server) -> Recorder:
    """Register ``POST /record`` and ``GET /record/{sessionid}`` on ``app`` for ``server``."""
    recorder = Recorder(server)
    app.router.add_post("/record", recorder.control)
    app.router.add_get("/record/{sessionid}", recorder.download)
    app.on_cleanup.append(recorder.on_cleanup)
    return recorder
