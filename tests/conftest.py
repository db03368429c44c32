"""Shared test helpers: paths to ../shared media and small fakes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDIA = ROOT.parent / "shared" / "media"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from basereal import LipSyncModel  # noqa: E402


def shared_media(name: str) -> Path:
    """Path of a file in ../shared/media; skips the test when it is absent."""
    path = SHARED_MEDIA / name
    if not path.exists():
        pytest.skip(f"{path} not present (no ../shared in a fresh clone)")
    return path


class FakeAvatar:
    """A tiny avatar: N flat frames whose value encodes the loop index."""

    def __init__(self, n: int = 4, size: int = 32) -> None:
        self.frames = [np.full((size, size, 3), i * 10, np.uint8) for i in range(n)]

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, i: int) -> np.ndarray:
        return self.frames[i % len(self.frames)]

    def frame_i420(self, i: int) -> np.ndarray:
        from avatar import to_i420

        return to_i420(self.frame(i))

    def composite(self, i: int, patch) -> np.ndarray:
        if patch is None:
            return self.frame(i)
        out = self.frame(i).copy()
        out[:] = 255
        return out


class FakeModel(LipSyncModel):
    """Records batches; features = frame RMS; renders a marker patch."""

    name = "fake"
    lookbehind_chunks = 1
    lookahead_chunks = 1

    def __init__(self, delay: float = 0.0) -> None:
        import threading

        self.delay = delay
        self.batches: list[int] = []
        self.resets = 0
        self.windows: list[int] = []
        self._gate = threading.Event()
        self._gate.set()

    def features(self, window: np.ndarray) -> np.ndarray:
        self.windows.append(len(window))
        return np.array([float(np.sqrt(np.mean(window**2)))], np.float32)

    def infer(self, features, loop_indices):
        import time

        self._gate.wait()
        self.batches.append(len(loop_indices))
        if self.delay:
            time.sleep(self.delay)  # simulates model compute time
        return ["patch"] * len(loop_indices)

    def reset(self) -> None:
        self.resets += 1


def tone(seconds: float, freq: float = 220.0, level: float = 0.3, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# -- real parts that tests need ---------------------------------------------------------
def require_installed(missing: str | None, how_to_get: str) -> None:
    """Skip the test when ``missing`` names a part that is not installed (a user's
    ``make test``); fail instead under REQUIRE_BROWSER_TESTS=1 (CI, whose .ci/run
    installs every part)."""
    import os

    if missing:
        if os.environ.get("REQUIRE_BROWSER_TESTS") == "1":
            pytest.fail(f"{missing} (REQUIRE_BROWSER_TESTS=1): {how_to_get}")
        pytest.skip(f"{missing}: {how_to_get}")


# -- a real server in a subprocess ------------------------------------------------------
from client import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--max_upload_mb", "2", "--max_session", "4")
    yield srv
    srv.stop()


# -- end-to-end helpers ------------------------------------------------------------------
SPEECH_RMS = 0.01  # received audio louder than this (-40 dBFS) is speech


def speech_input():
    """(kind, payload): yongen.wav when ../shared is there, else text for the offline TTS."""
    wav = SHARED_MEDIA / "yongen.wav"
    if wav.exists():
        return "file", wav
    return "text", "Hello there. I am the default avatar, and my lips move when I speak. This is a test of the streaming server."


def wait_for(cond, timeout=5.0):
    """Poll ``cond()`` every 10 ms until it holds; False after ``timeout`` s (tests only)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


async def wait_until(pred, timeout):
    """Poll the async predicate every 100 ms until it holds; False after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return True
        await asyncio.sleep(0.1)
    return False


def frame_rms(rec):
    return np.array([float(np.sqrt(np.mean(a * a))) for a in rec.audio])


async def not_(coro_fn):
    return not await coro_fn()


async def loud_since(rec, n0):
    return any(float(np.sqrt(np.mean(a * a))) > SPEECH_RMS for a in rec.audio[n0:])
