"""POST /record and GET /record/<sessionid> end to end: app.py in a subprocess (with
--api_key, a small --record_max_seconds), a real aiortc peer, PyAV decoding the files.
"""

import asyncio
import shutil
import time

import aiohttp
import numpy as np
import pytest

from bench.fmp4 import SPEECH_RMS, block_rms, received_from_mp4
from client import AvatarClient, ServerProcess, av_offset, mouth_box
from conftest import wait_until
from test_fmp4 import speech_wav

KEY = "record-test-key"
MAX_SECONDS = 4.0


@pytest.fixture(scope="module")
def recdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recordings") / "rec"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, recdir):
    srv = ServerProcess(tmp_path_factory.mktemp("record"), "--api_key", KEY, "--max_session", "2",
                        "--record_dir", str(recdir), "--record_max_seconds", str(MAX_SECONDS), "--peer_timeout", "2")
    yield srv
    srv.stop()


async def record(c: AvatarClient, kind: str) -> tuple[int, dict]:
    async with c.http.post(c.base_url + "/record", json={"sessionid": c.sessionid, "type": kind}, headers=c._auth()) as r:
        return r.status, await r.json()


async def download(c: AvatarClient, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token or c.token}"}
    async with c.http.get(f"{c.base_url}/record/{c.sessionid}", headers=headers) as r:
        return r.status, await r.read()


async def connected(srv) -> AvatarClient:
    c = AvatarClient(srv.url, api_key=KEY)
    await c.connect()
    await asyncio.wait_for(c.first_video.wait(), 20)
    await c.open_ws()
    return c


def test_recording_while_speaking(keyed, recdir):
    """start_record, speech, end_record: the file decodes, lasts as long as the
    recording (+-0.2 s), its audio is continuous and the mouth moves with the sound;
    the session's files are gone once it closes."""
    wav = speech_wav(2.5)

    async def run():
        c = await connected(keyed)
        try:
            t_start = time.monotonic()
            status, started = await record(c, "start_record")
            assert status == 200, started
            await asyncio.sleep(0.6)  # idle first: the mouth's reference
            assert (await c.push_audio(wav))["code"] == 0
            await asyncio.sleep(3.0)
            t_end = time.monotonic()
            status, ended = await record(c, "end_record")
            t_answer = time.monotonic()
            assert status == 200, ended
            got = await download(c)
            wrong = await download(c, token="wrong")
            files = sorted(p.name for p in recdir.iterdir())
        finally:
            await c.close()
        return t_start, t_end, t_answer, ended, got, wrong, files, c.sessionid

    t_start, t_end, t_answer, ended, (status, data), wrong, files, sid = asyncio.run(run())
    assert t_answer - t_end < 3.0, "end_record answered late"
    assert status == 200 and wrong[0] == 401
    assert files == [f"rec-{sid}-1.mp4"], files
    assert ended["bytes"] == len(data) and ended["url"] == f"/record/{sid}"
    wall = t_end - t_start
    rec, _ = received_from_mp4(data)
    vt = np.array(rec.video_t)
    length = len(vt) * 0.04
    assert abs(length - wall) <= 0.2 and abs(ended["duration_s"] - length) < 0.05, (length, wall, ended)
    at = np.array(rec.audio_t)
    block = 1024 / rec.audio_rate
    assert np.allclose(np.diff(at), block, atol=1e-4), "audio has gaps"
    assert abs(at[-1] + block - length) < 0.1
    loud = np.flatnonzero(block_rms(rec) > SPEECH_RMS)
    assert len(loud) * block > 1.8, "the speech is not in the recording"
    t0, t1 = at[loud[0]], at[loud[-1]] + block
    before = np.flatnonzero(vt < t0 - 0.1)
    lag, corr = av_offset(rec, mouth_box(rec.first_frame_bgr), t_range=(t0, t1), reference=rec.video[before[-1]])
    assert corr > 0.4 and abs(lag) <= 0.04, f"mouth vs audio in the recording: lag {lag * 1000:.0f} ms, r={corr:.2f}"
    # the peer left: the server closes the session (RTCP silence) and removes its files
    deadline = time.monotonic() + 10
    while any(recdir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(recdir.iterdir()), "the closed session's recording was left on disk"


def test_recording_refusals_and_bound(keyed):
    """Errors answered with messages (two start_record at once: one 409); a recording longer than --record_max_seconds ends
    there with an error event and its file is the session's last recording."""

    async def run():
        c = await connected(keyed)
        try:
            none = await download(c)
            not_recording = await record(c, "end_record")
            bad_type = await record(c, "pause")
            # Two at once: one recording (no await between the check and the claim).
            starts = sorted(await asyncio.gather(record(c, "start_record"), record(c, "start_record")),
                            key=lambda answer: answer[0])
            assert starts[0][0] == 200, starts
            twice = starts[1]
            assert await wait_until(lambda: error_event(c, "record_max_seconds"), MAX_SECONDS + 5)
            after = await record(c, "end_record")
            got = await download(c)
        finally:
            await c.close()
        return none, not_recording, bad_type, twice, after, got

    none, not_recording, bad_type, twice, after, (status, data) = asyncio.run(run())
    assert none[0] == 404 and b"no finished recording" in none[1]
    assert not_recording[0] == 409 and "not recording" in not_recording[1]["msg"]
    assert bad_type[0] == 400 and "start_record" in bad_type[1]["msg"]
    assert twice[0] == 409 and "already recording" in twice[1]["msg"]
    assert after[0] == 409, "the bound ended the recording"
    rec, _ = received_from_mp4(data)
    assert status == 200 and abs(len(rec.video_t) * 0.04 - MAX_SECONDS) <= 0.1


async def error_event(c: AvatarClient, text: str) -> bool:
    """An ``error`` event whose message contains ``text`` has reached the client's /ws."""
    return any(text in e.get("msg", "") for e in c.events_of("error"))


def test_write_error_ends_the_recording_not_the_session(keyed, recdir):
    """A --record_dir that cannot be written (here a file in its place) ends the
    recording with an error event; the session keeps streaming and speaking."""

    async def run():
        c = await connected(keyed)
        try:
            if recdir.exists():
                shutil.rmtree(recdir)
            recdir.write_bytes(b"not a folder")
            status, answer = await record(c, "start_record")
            assert await wait_until(lambda: error_event(c, "recording failed"), 5)
            frames = len(c.received.video_t)
            n = len(c.received.audio)
            assert (await c.say("Still talking after the failed recording."))["code"] == 0
            await asyncio.sleep(2.0)
            loud = [a for a in c.received.audio[n:] if np.sqrt(np.mean(a * a)) > SPEECH_RMS]
            ended = await record(c, "end_record")
            got = await download(c)
            return status, answer, len(c.received.video_t) - frames, len(loud), ended, got
        finally:
            await c.close()
            recdir.unlink(missing_ok=True)

    status, answer, frames, loud, ended, got = asyncio.run(run())
    assert status == 200, answer  # the error comes as an event, from the recording's thread
    assert frames >= 40, f"the session stalled: {frames} frames in 2 s"
    assert loud >= 10, "the session did not speak after the failed recording"
    assert ended[0] == 409 and "not recording" in ended[1]["msg"], ended
    assert got[0] == 404


# -- the recording thread, without a server ------------------------------------------------
class FakeSession:
    """What record.Recording uses of a session: id, bus, worker.playout, worker.clock."""

    def __init__(self, playout, now_slot: int) -> None:
        from types import SimpleNamespace

        self.id = "f" * 32
        self.events: list[dict] = []
        self.bus = SimpleNamespace(publish=self.events.append)
        clock = SimpleNamespace(started=True, current_slot=lambda: now_slot)  # the slot being sent
        self.worker = SimpleNamespace(playout=playout, clock=clock)


def record_units(tmp_path, slots: int, max_bytes: int, monkeypatch=None, fail_after: int | None = None):
    """Run a Recording over ``slots`` slots of noisy frames (the tracks' side driven here)."""
    import errno

    import record
    from playout import MediaUnit, PlayoutBuffer

    if fail_after is not None:
        write = record._BoundedFile.write

        def failing(self, data):
            if self.written + len(data) > fail_after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(self, data)

        monkeypatch.setattr(record._BoundedFile, "write", failing)
    rng = np.random.default_rng(1)
    pb = PlayoutBuffer(lambda i: np.full((96, 64), 16, np.uint8), 4, idle_format="yuv420p", capacity=slots,
                       history=slots)
    for _ in range(slots):
        pb.put(MediaUnit(video=rng.integers(0, 255, (96, 64), np.uint8), audio=np.zeros(640, np.int16),
                         loop_index=0, video_format="yuv420p"))
    session = FakeSession(pb, now_slot=slots - 1)
    rec = record.Recording(session, tmp_path / "r.mp4", max_seconds=60, max_bytes=max_bytes)
    rec.start()
    for s in range(slots):
        pb.unit_for_slot(s)
    rec.end()  # at the last slot
    return rec, rec.done.result(10), session.events


def test_full_disk_ends_the_recording_with_an_error_event(tmp_path, monkeypatch):
    """A write that fails mid-recording (ENOSPC) ends it with an error event naming the
    error; the partial file is removed."""
    rec, error, events = record_units(tmp_path, 100, 10**9, monkeypatch, fail_after=20_000)
    assert not rec.ok and "No space left" in error
    assert [e["type"] for e in events] == ["error"] and "recording failed" in events[0]["msg"]
    assert not (tmp_path / "r.mp4").exists()


def test_size_bound_keeps_a_playable_file(tmp_path):
    """Reaching --record_max_mb ends the recording with an error event; the file so
    far stays and decodes."""
    rec, error, events = record_units(tmp_path, 100, 60_000)
    assert rec.ok and "record_max_mb" in error and "record_max_mb" in events[0]["msg"]
    size = (tmp_path / "r.mp4").stat().st_size
    assert size <= 60_000
    decoded, _ = received_from_mp4((tmp_path / "r.mp4").read_bytes())
    assert 0 < len(decoded.video_t) < 100


def test_shutdown_removes_recordings(tmp_path):
    """A server stopped (SIGTERM) while one session records and another holds a finished
    recording leaves no file behind."""
    recdir = tmp_path / "rec"
    srv = ServerProcess(tmp_path, "--api_key", KEY, "--record_dir", str(recdir))

    async def run():
        a, b = await connected(srv), await connected(srv)
        assert (await record(a, "start_record"))[0] == 200
        assert (await record(b, "start_record"))[0] == 200
        await asyncio.sleep(0.5)
        assert (await record(b, "end_record"))[0] == 200
        files = sorted(p.name for p in recdir.iterdir())
        await a.close()
        await b.close()  # the server notices only after --peer_timeout: it is stopped before
        return files

    try:
        files = asyncio.run(run())
    finally:
        srv.stop()
    assert len(files) == 2, files
    assert not list(recdir.iterdir()), "recordings left on disk after shutdown"


def test_a_failed_recordings_file_is_forgotten_only_once_removed(tmp_path):
    """A failed recording whose file its thread could not remove stays listed, so the
    session's clean-up removes it; one that is gone is forgotten."""
    from types import SimpleNamespace

    from record import Recorder, _SessionRecords

    recorder = Recorder(SimpleNamespace(args=SimpleNamespace(record_dir=str(tmp_path))))
    kept, gone = tmp_path / "kept.mp4", tmp_path / "gone.mp4"
    recorder.sessions["s"] = records = _SessionRecords(files={kept, gone})
    recorder._finished("s", SimpleNamespace(ok=False, removed=False, path=kept))
    recorder._finished("s", SimpleNamespace(ok=False, removed=True, path=gone))
    assert records.files == {kept}
