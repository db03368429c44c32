"""Shared test helpers: paths to ../shared media and small fakes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDIA = ROOT.parent / "shared" / "media"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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

    def composite(self, i: int, patch) -> np.ndarray:
        if patch is None:
            return self.frame(i)
        out = self.frame(i).copy()
        out[:] = 255
        return out


class FakeModel:
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


# -- a real server in a subprocess ------------------------------------------------------
import os
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python app.py`` on a free loopback port; stopped on exit."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
               "--avatars_dir", str(tmp / "avatars"), "--tts", "espeak", *args]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/status", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)  # waiting for the subprocess to listen
        raise RuntimeError("server did not start")

    def status(self) -> dict:
        import json

        return json.loads(urllib.request.urlopen(self.url + "/status", timeout=5).read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--max_upload_mb", "2", "--max_session", "4")
    yield srv
    srv.stop()
