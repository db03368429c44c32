"""A headless aiortc client for the avatar server, and A/V measurements on what it receives.

Used by the end-to-end tests and the benchmarks, and handy for recording a
session without a browser::

    async with AvatarClient("http://127.0.0.1:8010") as c:
        await c.push_audio_file("speech.wav")
        await asyncio.sleep(5)

Received media is kept on each track's own media timeline (seconds from that
track's first pts; the server starts both tracks at slot/chunk 0, so the two
timelines share an origin), plus the local arrival time of every frame.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import aiohttp
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

VIDEO_SCALE = 0.5  # received frames are kept as grayscale at this scale


@dataclass
class Received:
    """What a client has received so far.

    Attributes:
        video_t: media time (s) of each video frame.
        video_arrival: monotonic arrival time (s) of each video frame.
        video: grayscale uint8 frames at VIDEO_SCALE.
        first_frame_bgr: the first frame in full resolution (BGR uint8).
        audio_t: media time (s) of each audio frame's first sample.
        audio_arrival: monotonic arrival time (s) of each audio frame.
        audio: mono float32 sample blocks at ``audio_rate``.
        rtp_audio: (RTP timestamp, monotonic arrival s) of every audio packet as it
            reached the receiver, below aiortc's jitter buffer (see ``rtp_arrival``).
    """

    video_t: list[float] = field(default_factory=list)
    video_arrival: list[float] = field(default_factory=list)
    video: list[np.ndarray] = field(default_factory=list)
    first_frame_bgr: np.ndarray | None = None
    audio_t: list[float] = field(default_factory=list)
    audio_arrival: list[float] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    audio_rate: int = 48000
    rtp_audio: list[tuple[int, float]] = field(default_factory=list)
    audio_pts0: int | None = None

    def rtp_arrival(self, media_t: float) -> float | None:
        """Monotonic time (s) the first RTP packet carrying audio media time ``media_t``
        (s, on :attr:`audio_t`'s timeline) reached the receiver, before any jitter
        buffer; None if no such packet arrived."""
        if self.audio_pts0 is None or not self.rtp_audio:
            return None
        origin = self.rtp_audio[0][0]  # aiortc's decoded pts count from the first packet's timestamp
        for ts, arrival in self.rtp_audio:
            pts = (ts - origin) & 0xFFFFFFFF
            if (pts - self.audio_pts0) / self.audio_rate + 0.02 > media_t + 1e-6:
                return arrival
        return None

    def audio_signal(self) -> np.ndarray:
        """All received audio, concatenated (float32, ``audio_rate``)."""
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


class AvatarClient:
    """Connects to a server, receives both tracks and drives the HTTP API."""

    def __init__(self, base_url: str, keep_media: bool = True, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key  # sent with the offer; the session's token with everything after
        self.token: str | None = None
        self.keep_media = keep_media  # False: only count frames and arrival times (load tests)
        self.pc = RTCPeerConnection()
        self.http: aiohttp.ClientSession | None = None
        self.sessionid: str | None = None
        self.received = Received()
        self._tasks: list[asyncio.Task] = []
        self._v0: int | None = None
        self._a0: int | None = None
        self.first_video = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.events: list[tuple[float, dict]] = []  # (monotonic arrival, event) from /ws
        self.mic_track = None  # a MediaStreamTrack to send as the microphone ("mic": "lipsync")
        self.offer_extra: dict = {}  # more fields for the /offer body (e.g. avatar)
        self.mic_mode = "lipsync"  # what the server does with mic_track: "lipsync" or "converse"

    async def __aenter__(self) -> "AvatarClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> str:
        """Negotiate a session (non-trickle ICE, like the reference page). Returns its id."""
        self.http = aiohttp.ClientSession()
        self.pc.addTransceiver("video", direction="recvonly")
        if self.mic_track is not None:
            self.pc.addTransceiver(self.mic_track, direction="sendrecv")
        else:
            self.pc.addTransceiver("audio", direction="recvonly")

        self._consume_tracks()

        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        if self.mic_track is not None:
            offer["mic"] = self.mic_mode
        offer.update(self.offer_extra)
        answer = await self.post("/offer", offer)
        if answer.get("code", 0) != 0:
            raise RuntimeError(f"offer refused: {answer.get('msg')}")
        self.sessionid = answer["sessionid"]
        self.token = answer.get("token")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        self._tap_audio_receivers()
        return self.sessionid

    def _tap_rtp(self, receiver) -> None:
        """Record each audio RTP packet's timestamp and arrival time as the transport
        hands it to the receiver (before the jitter buffer's prefetch)."""
        handle = receiver._handle_rtp_packet
        taps = self.received.rtp_audio

        async def tapped(packet, arrival_time_ms):
            taps.append((packet.timestamp, time.monotonic()))
            return await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = tapped

    def _consume_tracks(self) -> None:
        """Keep every incoming track's frames (video, audio) as they are received."""
        @self.pc.on("track")
        def on_track(track) -> None:
            consume = self._consume_video if track.kind == "video" else self._consume_audio
            self._tasks.append(asyncio.ensure_future(consume(track)))

    def _tap_audio_receivers(self) -> None:
        """Tap the RTP arrivals of every audio receiver (once the answer is applied)."""
        for receiver in self.pc.getReceivers():
            if receiver.track is not None and receiver.track.kind == "audio":
                self._tap_rtp(receiver)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.ws is not None:
            await self.ws.close()
        await self.pc.close()
        if self.http is not None:
            await self.http.close()

    def _auth(self) -> dict[str, str]:
        credential = self.token if (self.token and self.api_key) else self.api_key
        return {"Authorization": f"Bearer {credential}"} if credential else {}

    async def get(self, path: str) -> dict:
        assert self.http is not None
        async with self.http.get(self.base_url + path, headers=self._auth()) as r:
            return await r.json()

    async def post(self, path: str, body: dict) -> dict:
        assert self.http is not None
        async with self.http.post(self.base_url + path, json=body, headers=self._auth()) as r:
            return await r.json()

    async def say(self, text: str, interrupt: bool = False) -> dict:
        return await self.post("/human", {"sessionid": self.sessionid, "text": text, "type": "echo", "interrupt": interrupt})

    async def interrupt(self) -> dict:
        return await self.post("/interrupt_talk", {"sessionid": self.sessionid})

    async def is_speaking(self) -> bool:
        return bool((await self.post("/is_speaking", {"sessionid": self.sessionid}))["data"])

    async def open_ws(self) -> aiohttp.ClientWebSocketResponse:
        """Open the session's ``/ws``; its events are collected in :attr:`events`."""
        assert self.http is not None
        self.ws = await self.http.ws_connect(f"{self.base_url}/ws?sessionid={self.sessionid}", headers=self._auth())

        async def read() -> None:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.events.append((time.monotonic(), json.loads(msg.data)))

        self._tasks.append(asyncio.ensure_future(read()))
        return self.ws

    async def stream_audio(self, pcm16k: np.ndarray, rate: int = 16000, fmt: str = "s16le", chunk_ms: int = 40,
                           framing: str = "raw", realtime: bool = True, end: bool = True,
                           stall: tuple[float, float] | None = None,
                           mangle: Callable[[int, bytes], bytes | None] | None = None, **start) -> list[float]:
        """Stream ``pcm16k`` (float32 16 kHz mono) over ``/ws`` as one utterance.

        Resamples to ``rate``, encodes as ``fmt`` in ``chunk_ms`` messages with
        ``framing``, paced in real time (``realtime``); ``stall`` = (at_s, for_s) pauses
        the producer once; ``mangle(seq, message)`` may alter a message or return None
        to skip it. Extra ``start`` fields are sent in the start message.
        Returns the monotonic send time of each message.
        """
        from audio import resample
        from ingest import build_frame

        assert self.ws is not None
        pcm = resample(pcm16k, 16000, rate) if rate != 16000 else pcm16k
        data = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes() if fmt == "s16le" else pcm.astype("<f4").tobytes()
        step = rate * chunk_ms // 1000 * (2 if fmt == "s16le" else 4)
        await self.ws.send_json({"type": "start", "sample_rate": rate, "format": fmt, "framing": framing, **start})
        sent, t0 = [], time.monotonic()
        for seq, i in enumerate(range(0, len(data), step)):
            media_t = seq * chunk_ms / 1000
            if stall is not None and media_t >= stall[0]:
                media_t += stall[1]
            if realtime:
                await asyncio.sleep(max(0.0, t0 + media_t - time.monotonic()))
            payload = data[i : i + step]
            message = build_frame(seq, payload) if framing == "crc32" else payload
            if mangle is not None:
                message = mangle(seq, message)
            if message is not None:
                await self.ws.send_bytes(message)
            sent.append(time.monotonic())
        if end:
            await self.ws.send_json({"type": "end"})
        return sent

    def events_of(self, kind: str) -> list[dict]:
        """The collected /ws events of type ``kind``, in arrival order."""
        return [e for _, e in self.events if e.get("type") == kind]

    async def push_audio(self, data: bytes, filename: str = "speech.wav") -> dict:
        assert self.http is not None
        form = aiohttp.FormData()
        form.add_field("sessionid", self.sessionid)
        form.add_field("file", data, filename=filename)
        async with self.http.post(self.base_url + "/humanaudio", data=form, headers=self._auth()) as r:
            return await r.json()

    async def push_audio_file(self, path: str | Path) -> dict:
        path = Path(path)
        return await self.push_audio(path.read_bytes(), path.name)

    async def _consume_video(self, track) -> None:
        rec = self.received
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if self._v0 is None:
                    self._v0 = frame.pts
                    rec.first_frame_bgr = frame.to_ndarray(format="bgr24")
                if self.keep_media:
                    gray = frame.to_ndarray(format="gray")
                    rec.video.append(cv2.resize(gray, None, fx=VIDEO_SCALE, fy=VIDEO_SCALE, interpolation=cv2.INTER_AREA))
                rec.video_t.append(float((frame.pts - self._v0) * frame.time_base))
                rec.video_arrival.append(now)
                self.first_video.set()
        except MediaStreamError:
            pass

    async def _consume_audio(self, track) -> None:
        rec = self.received
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if self._a0 is None:
                    self._a0 = rec.audio_pts0 = frame.pts
                if not self.keep_media:
                    rec.audio_arrival.append(now)
                    continue
                samples = frame.to_ndarray().astype(np.float32) / 32768.0
                channels = len(frame.layout.channels)
                mono = samples.reshape(-1, channels).mean(axis=1) if frame.format.is_packed else samples.mean(axis=0)
                rec.audio_rate = frame.sample_rate
                rec.audio.append(mono)
                rec.audio_t.append(float((frame.pts - self._a0) * frame.time_base))
                rec.audio_arrival.append(now)
        except MediaStreamError:
            pass


class MicrophoneTrack:
    """A client microphone for tests and benchmarks: an aiortc audio track (48 kHz
    mono s16, 20 ms frames, paced in real time) that sends what :meth:`say` queued,
    mixed with an *echo* of what the client receives (the avatar's voice played by a
    speaker and picked up again): ``echo_gain`` (linear; 0.1 = -20 dB), played from a
    buffer of ``echo_delay`` s (s) after it arrived. Silence otherwise.

    Use ``client.mic_track = MicrophoneTrack(client.received).track`` before connect.
    """

    RATE = 48000
    FRAME = 960

    def __init__(self, received: Received, echo_gain: float = 0.0, echo_delay: float = 0.06) -> None:
        from aiortc import MediaStreamTrack

        mic = self

        class _Track(MediaStreamTrack):
            kind = "audio"

            async def recv(self):
                return await mic._next_frame()

        self.track = _Track()
        self.received = received
        self.echo_gain = echo_gain
        self.echo_delay = echo_delay
        self._speech = np.zeros(0, np.float32)
        self._n = 0
        self._t0: float | None = None
        self.speech_started_at: float | None = None  # monotonic time the first queued sample went out
        self._echo_frame = 0  # next received frame the "speaker" plays
        self._echo_playing = False

    def say(self, pcm16k: np.ndarray) -> None:
        """Queue 16 kHz float32 speech to be sent from the next frame on."""
        from audio import resample

        self._speech = np.concatenate([self._speech, resample(pcm16k, 16000, self.RATE)])
        self.speech_started_at = None

    def _echo(self, n: int) -> np.ndarray:
        """The next ``n`` samples of the avatar's voice as a speaker plays it: the
        received audio in order, once ``echo_delay`` s of it are buffered (a speaker
        plays continuously; received frames arrive in bursts), scaled by ``echo_gain``."""
        rec = self.received
        if not self.echo_gain or rec.audio_rate != self.RATE:
            return np.zeros(n, np.float32)
        buffered = len(rec.audio) - self._echo_frame
        if buffered <= max(1, round(self.echo_delay / 0.02)) and not self._echo_playing:
            return np.zeros(n, np.float32)
        if buffered <= 0:  # the speaker ran dry: wait to buffer again
            self._echo_playing = False
            return np.zeros(n, np.float32)
        self._echo_playing = True
        block = rec.audio[self._echo_frame]
        self._echo_frame += 1
        return self.echo_gain * np.pad(block[:n], (0, max(0, n - len(block))))

    async def _next_frame(self):
        from av import AudioFrame

        if self._t0 is None:
            self._t0 = time.monotonic()
        due = self._t0 + self._n * self.FRAME / self.RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        pcm = self._echo(self.FRAME)
        if len(self._speech):
            if self.speech_started_at is None:
                self.speech_started_at = time.monotonic()
            part = self._speech[: self.FRAME]
            self._speech = self._speech[self.FRAME :]
            pcm[: len(part)] += part
        frame = AudioFrame.from_ndarray((np.clip(pcm, -1, 1) * 32767).astype(np.int16).reshape(1, -1),
                                        format="s16", layout="mono")
        frame.sample_rate = self.RATE
        frame.pts = self._n * self.FRAME
        frame.time_base = Fraction(1, self.RATE)
        self._n += 1
        return frame


def set_audio_prefetch(packets: int) -> None:
    """Set how many later packets aiortc's audio jitter buffer waits for (default 4).

    aiortc releases an audio packet only once ``prefetch`` later packets have
    arrived: a fixed 80-100 ms at 20 ms per packet. A browser's adaptive jitter
    buffer holds far less on a clean loopback link; benchmarks use this to report
    the figure both ways.
    """
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.jitterbuffer import JitterBuffer

    class _Prefetch(JitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(capacity, prefetch if is_video else packets, is_video)

    receiver.JitterBuffer = _Prefetch


# -- measurements -----------------------------------------------------------------
def mouth_box(frame_bgr: np.ndarray, scale: float = VIDEO_SCALE, margin: float = 0.35) -> tuple[int, int, int, int]:
    """Box (x1, y1, x2, y2) around the lips (iBUG points 48-67) at ``scale``.

    Raises:
        ValueError: no face found in the frame.
    """
    from avatar import detect_landmarks

    lm = detect_landmarks(frame_bgr)
    if lm is None:
        raise ValueError("no face in the received frame")
    lips = lm[48:68]
    (x1, y1), (x2, y2) = lips.min(axis=0), lips.max(axis=0)
    w, h = x2 - x1, y2 - y1
    x1, x2 = x1 - margin * w, x2 + margin * w
    y1, y2 = y1 - margin * h, y2 + 1.2 * h  # the jaw drops below the lips
    return tuple(int(round(v * scale)) for v in (x1, y1, x2, y2))  # type: ignore[return-value]


def mouth_motion(rec: Received, box: tuple[int, int, int, int], reference: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute difference (grey levels) of the mouth box from the idle frame, per video frame."""
    x1, y1, x2, y2 = box
    ref = (rec.video[0] if reference is None else reference)[y1:y2, x1:x2].astype(np.float32)
    return np.array([np.abs(f[y1:y2, x1:x2].astype(np.float32) - ref).mean() for f in rec.video], np.float32)


def audio_envelope(rec: Received, times: np.ndarray, window: float = 0.04) -> np.ndarray:
    """RMS of the received audio in a ``window`` (s) centred on each of ``times`` (media s)."""
    signal = rec.audio_signal()
    if not rec.audio_t:
        return np.zeros(len(times), np.float32)
    rate = rec.audio_rate
    start = rec.audio_t[0]
    half = int(window * rate / 2)
    out = np.zeros(len(times), np.float32)
    for i, t in enumerate(times):
        c = int(round((t - start) * rate))
        seg = signal[max(0, c - half) : max(0, c + half)]
        out[i] = float(np.sqrt(np.mean(seg * seg))) if len(seg) else 0.0
    return out


def av_offset(rec: Received, box: tuple[int, int, int, int], max_lag: float = 0.2, step: float = 0.005,
              t_range: tuple[float, float] | None = None, reference: np.ndarray | None = None,
              held: bool = False) -> tuple[float, float]:
    """Lag (s) that best aligns mouth motion with the audio envelope, and the peak correlation.

    ``held``: each frame is held on screen from its pts until the next (as a display
    shows it) instead of interpolated between pts; reads about half a frame (20 ms) more.

    Both series are put on a ``step`` grid of media time and cross-correlated
    (Pearson) for lags in ``[-max_lag, max_lag]``. A positive lag means the mouth
    moves *after* the sound (video late).
    """
    vt = np.asarray(rec.video_t)
    motion = mouth_motion(rec, box, reference)
    lo, hi = (vt[0], vt[-1]) if t_range is None else t_range
    grid = np.arange(lo + max_lag, hi - max_lag, step)
    return best_lag(vt, motion, grid, audio_envelope(rec, grid), max_lag, step, held)


def best_lag(video_t: np.ndarray, motion: np.ndarray, grid: np.ndarray, env: np.ndarray, max_lag: float = 0.2,
             step: float = 0.005, held: bool = False) -> tuple[float, float]:
    """The core of :func:`av_offset` on plain arrays: the lag (s) in ``[-max_lag, max_lag]``
    (``step`` s apart) at which mouth motion best correlates (Pearson) with the audio
    envelope, and that peak correlation ((0.0, -1.0) when nothing varies).

    Args:
        video_t: (N,) increasing times (s) of the video frames, on any clock shared with ``grid``.
        motion: (N,) mouth motion per frame (e.g. :func:`mouth_motion`).
        grid: (M,) times (s) at which the envelope was taken.
        env: (M,) audio envelope (e.g. RMS) at ``grid``.
        held: each frame stands from its time until the next (as a display shows it)
            instead of being interpolated between frame times.

    A positive lag means the mouth moves *after* the sound (video late).
    """
    vt = np.asarray(video_t, np.float64)
    motion = np.asarray(motion, np.float32)
    grid = np.asarray(grid, np.float64)
    env = np.asarray(env, np.float32)
    best = (0.0, -1.0)
    for lag in np.arange(-max_lag, max_lag + step / 2, step):
        if held:
            m = motion[np.clip(np.searchsorted(vt, grid + lag, side="right") - 1, 0, len(vt) - 1)]
        else:
            m = np.interp(grid + lag, vt, motion)
        if m.std() == 0 or env.std() == 0:
            continue
        r = float(np.corrcoef(m, env)[0, 1])
        if r > best[1]:
            best = (float(lag), r)
    return best


# -- a server in a subprocess ------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python app.py`` on a free loopback port (tests and benchmarks).

    Args:
        workdir: folder for the server log and its avatar cache.
        *args: extra ``app.py`` options.
    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` s.
    """

    def __init__(self, workdir: Path, *args: str, timeout: float = 120.0) -> None:
        root = Path(__file__).resolve().parent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(workdir) / f"server-{self.port}.log"
        self.args = args
        cmd = [sys.executable, str(root / "app.py"), "--port", str(self.port),
               "--avatars_dir", str(Path(workdir) / "avatars"), "--tts", "espeak", *args]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                self.status()
                return
            except OSError:
                time.sleep(0.2)  # polling a subprocess until it listens
        self.stop()
        raise RuntimeError("server did not start")

    def status(self) -> dict:
        request = urllib.request.Request(self.url + "/status")
        if "--api_key" in self.args:
            request.add_header("Authorization", "Bearer " + self.args[self.args.index("--api_key") + 1])
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()


# -- WHEP and Janus viewers (issue #11) -----------------------------------------------------
class WhepViewer(AvatarClient):
    """A WHEP player (draft-ietf-wish-whep): ``POST /whep/<sessionid>`` (or ``/whep``
    for a new session) with a recvonly offer; ``close`` DELETEs the resource.

    Args:
        base_url: the server.
        sessionid: the session to watch (None: ``POST /whep`` starts one; its id and
            token come back in ``X-Session-Id`` / ``X-Session-Token``).
        token: bearer token (the session's token or the API key), if the server needs one.
    Attributes:
        resource: the viewer's resource URL (absolute), once connected.
    """

    def __init__(self, base_url: str, sessionid: str | None = None, token: str | None = None, **kw) -> None:
        super().__init__(base_url, **kw)
        self.sessionid = sessionid
        self.token = token
        self.resource: str | None = None

    def _auth(self) -> dict[str, str]:
        credential = self.token or self.api_key
        return {"Authorization": f"Bearer {credential}"} if credential else {}

    async def connect(self) -> str:
        from urllib.parse import urljoin

        self.http = aiohttp.ClientSession()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")

        self._consume_tracks()

        await self.pc.setLocalDescription(await self.pc.createOffer())
        url = self.base_url + "/whep" + (f"/{self.sessionid}" if self.sessionid else "")
        headers = {"Content-Type": "application/sdp", **self._auth()}
        async with self.http.post(url, data=self.pc.localDescription.sdp.encode(), headers=headers) as r:
            body = await r.text()
            if r.status != 201:
                raise RuntimeError(f"WHEP refused: {r.status} {body[:200]}")
            self.resource = urljoin(url, r.headers["Location"])
            if self.sessionid is None:
                self.sessionid, self.token = r.headers["X-Session-Id"], r.headers["X-Session-Token"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        self._tap_audio_receivers()
        return self.sessionid

    async def delete(self) -> int:
        """DELETE the viewer's resource; returns the status."""
        assert self.http is not None and self.resource is not None
        async with self.http.delete(self.resource, headers=self._auth()) as r:
            return r.status

    async def close(self) -> None:
        if self.http is not None and self.resource is not None and not self.http.closed:
            try:
                await self.delete()
            except aiohttp.ClientError:
                pass
        await super().close()


class JanusViewer(AvatarClient):
    """A subscriber to a session published into a Janus VideoRoom (``POST /janus``):
    receives through Janus, not from the server. ``base_url``: the avatar server
    (for ``say`` and friends, with ``sessionid``/``token`` set by the caller)."""

    def __init__(self, base_url: str, janus_url: str, room: int, feed: int, **kw) -> None:
        super().__init__(base_url, **kw)
        self.janus_url, self.room, self.feed = janus_url, room, feed
        self.subscriber = None

    async def connect(self) -> str:
        from janus import JanusSubscriber

        self.http = aiohttp.ClientSession()

        self._consume_tracks()

        self.subscriber = JanusSubscriber(self.janus_url, self.pc)
        await self.subscriber.subscribe(self.room, self.feed)
        self._tap_audio_receivers()
        return self.sessionid or ""

    async def close(self) -> None:
        if self.subscriber is not None:
            await self.subscriber.close()
        await super().close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (s) a process has used so far (Linux ``/proc/<pid>/stat``)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
