"""aiortc media tracks driven by one shared session clock.

Both tracks of a session read the same :class:`playout.PlayoutBuffer` on the same
:class:`clock.SessionClock`: video frame ``s`` and audio chunks ``2s``, ``2s+1``
come from one :class:`playout.MediaUnit`, and their pts are derived from the slot
and chunk counts, so audio and video cannot drift apart.

Pacing: a track whose next frame is early waits for its due time (the video
waits); a video track that is later than ``drop_threshold`` skips the stale
frames (counted as dropped) instead of sending a burst, so the pair stays within
one frame. Audio is never skipped: a late audio chunk goes out at once.
Each track's first frame is slot/chunk 0, so a receiver can align the two
streams by their first pts.

More viewers of one session (WHEP viewers, a WHIP push, a Janus publisher) get
their own pair of tracks with ``primary=False`` and a shared :class:`JoinPoint`:
they start at the next slot on the already running clock (video slot ``s``, audio
chunk ``2s``), read the same units with the same pts, and leave the session's
metrics, playback events and echo tap to the primary pair.
"""

from __future__ import annotations

import asyncio
import logging
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

import aioice.ice
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from audio import StreamResampler
from clock import (
    AUDIO_CHUNKS_PER_FRAME,
    CHUNK_MS,
    CHUNK_SAMPLES,
    FRAME_MS,
    SAMPLE_RATE,
    VIDEO_TIME_BASE,
    chunk_slot,
    video_pts,
)
from playout import SILENCE

if TYPE_CHECKING:
    from basereal import BaseReal

log = logging.getLogger(__name__)

LATE_MS = FRAME_MS // 2  # a frame sent more than half a frame after due counts as late


class JoinPoint:
    """The slot at which a secondary pair of tracks joins a running session clock.

    The first of the pair to ask fixes it (the slot after the current one, so its
    first frame waits for its due time instead of going out late); the other gets
    the same, so the pair's first video frame and first audio chunk are one unit.
    """

    def __init__(self) -> None:
        self.slot: int | None = None

    def first_slot(self, clock) -> int:
        if self.slot is None:
            self.slot = max(0, clock.current_slot() + 1)
        return self.slot


JOIN_POLL_S = FRAME_MS / 1000  # a secondary track polls this often for the session clock to start


class _SessionTrack(MediaStreamTrack):
    def __init__(self, worker: "BaseReal", join: JoinPoint | None = None) -> None:
        super().__init__()
        self.worker = worker
        self.clock = worker.clock
        self.playout = worker.playout
        self.metrics = worker.metrics
        self._next = 0
        self.join = join  # None: the session's primary track (starts the clock at slot 0)
        self.primary = join is None

    async def _start(self, per_slot: int) -> None:
        """Start the clock (primary), or wait for it and take the join slot (secondary)."""
        if self.primary:
            self.clock.start()
            return
        while not self.clock.started:  # the session's own peer has not started its tracks yet
            self._check_live()
            await asyncio.sleep(JOIN_POLL_S)
        if self._next == 0:
            self._next = self.join.first_slot(self.clock) * per_slot

    async def _wait_until(self, due: float) -> float:
        now = self.clock.now()
        if now < due:
            await asyncio.sleep(due - now)
            now = self.clock.now()
        return now

    def _check_live(self) -> None:
        if self.readyState != "live" or self.worker.stopped:
            raise MediaStreamError


class AvatarVideoTrack(_SessionTrack):
    """25 fps video track; frame ``s`` has pts ``s * 3600`` in 1/90000 s."""

    kind = "video"

    async def recv(self) -> VideoFrame:
        self._check_live()
        await self._start(1)
        slot = self._next
        now = self.clock.now()
        if slot > 0 and now - self.clock.slot_due(slot) > self.worker.options.drop_threshold_ms / 1000:
            nearest = self.clock.current_slot(now + FRAME_MS / 2000)  # round, not floor
            if nearest > slot:
                if self.primary:
                    self.metrics.video_dropped(nearest - slot)
                slot = nearest
        now = await self._wait_until(self.clock.slot_due(slot))
        lateness = now - self.clock.slot_due(slot) if slot > 0 else 0.0
        unit = self.playout.unit_for_slot(slot)
        frame = VideoFrame.from_ndarray(unit.video, format=unit.video_format)
        frame.pts = video_pts(slot)
        frame.time_base = VIDEO_TIME_BASE
        self._next = slot + 1
        if not self.primary:
            return frame
        self.metrics.video_sent(speech=not unit.idle, late=lateness > LATE_MS / 1000, lateness=lateness)
        if not unit.idle:
            unit.stamps["sent"] = now
            self.metrics.observe_stages(unit.t_in, unit.stamps)
        return frame


# The audio track sends 48 kHz, Opus's own rate (RFC 7587): aiortc's Opus encoder then
# takes each 20 ms chunk as it is. Fed 16 kHz, its resampler holds every chunk back
# until the next one arrives (its filter delay leaves the first 960-sample frame
# short), so each packet would leave 20 ms late: later first speech, later silence
# after an interrupt, and audio 20 ms behind video in a receiver's RTCP-based sync.
TRACK_RATE = 48000  # Hz
TRACK_CHUNK = TRACK_RATE * CHUNK_MS // 1000  # 960 samples per 20 ms chunk
TRACK_TIME_BASE = Fraction(1, TRACK_RATE)


class AvatarAudioTrack(_SessionTrack):
    """48 kHz mono s16 audio track in 20 ms chunks; chunk ``k`` has pts ``k * 960``
    (the session's 16 kHz audio, upsampled as one stream, ~1 ms behind)."""

    kind = "audio"

    def __init__(self, worker: "BaseReal", join: JoinPoint | None = None) -> None:
        super().__init__(worker, join)
        self._upsampler = StreamResampler(SAMPLE_RATE, TRACK_RATE)
        self._pending = np.zeros(0, np.float32)  # upsampled audio not yet sent
        self.on_sent: Callable[[np.ndarray], None] | None = None  # gets each int16 16 kHz chunk sent

    def _upsample(self, samples: np.ndarray) -> np.ndarray:
        """One 16 kHz int16 chunk -> exactly TRACK_CHUNK int16 samples at 48 kHz; the
        filter's ~1 ms delay is paid once, as leading zeros in the first chunk."""
        out = self._upsampler.process(samples.astype(np.float32) / np.float32(32768.0))
        pending = np.concatenate([self._pending, out])
        if len(pending) < TRACK_CHUNK:
            pending = np.concatenate([np.zeros(TRACK_CHUNK - len(pending), np.float32), pending])
        chunk, self._pending = pending[:TRACK_CHUNK], pending[TRACK_CHUNK:]
        return np.clip(chunk * 32768.0, -32768, 32767).astype(np.int16)

    async def recv(self) -> AudioFrame:
        self._check_live()
        await self._start(AUDIO_CHUNKS_PER_FRAME)
        chunk = self._next
        await self._wait_until(self.clock.chunk_due(chunk))
        unit = self.playout.unit_for_slot(chunk_slot(chunk))
        part = chunk % AUDIO_CHUNKS_PER_FRAME
        audible = unit.epoch == self.playout.epoch
        if audible:
            samples = unit.audio[part * CHUNK_SAMPLES : (part + 1) * CHUNK_SAMPLES]
        else:  # interrupted mid-slot: the rest is silence
            samples = SILENCE[:CHUNK_SAMPLES]
        if self.on_sent is not None and self.primary:
            self.on_sent(samples)
        frame = AudioFrame.from_ndarray(self._upsample(samples).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TRACK_RATE
        frame.pts = chunk * TRACK_CHUNK
        frame.time_base = TRACK_TIME_BASE
        self._next = chunk + 1
        if self.primary:
            self.metrics.audio_sent()
            self.worker.playback.on_chunk(unit, part, audible, chunk)
        return frame


MAX_SDP_BYTES = 64 * 1024  # an offer with a few m-lines and all its candidates is ~3-10 KB


def check_offer(sdp: str, send: bool = False, candidates: bool = True) -> None:
    """Refuse an offer that can never connect, before any session is made for it.

    Checks (RFC 8829/8839 requirements a non-trickle offer must meet): size at most
    MAX_SDP_BYTES; parses; a DTLS fingerprint for every media section; an ICE
    username fragment; at least one UDP candidate (the offer carries its candidates:
    no trickle on ``/offer``); at least one audio or video section that can receive
    (``recvonly`` or ``sendrecv``).

    ``send``: the offerer publishes (WHIP): an audio section that can send
    (``sendonly`` or ``sendrecv``) is required instead. ``candidates=False``: an
    offer without candidates passes (WHEP/WHIP players that send their offer before
    gathering; ICE then finds their address from their connectivity checks).

    Raises:
        ValueError: with what is wrong, in words a client developer can act on.
    """
    from aiortc.sdp import SessionDescription

    if len(sdp) > MAX_SDP_BYTES:
        raise ValueError(f"offer of {len(sdp)} bytes exceeds {MAX_SDP_BYTES}")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:  # aiortc's parser raises ValueError, KeyError, IndexError...
        raise ValueError(f"unparseable SDP ({type(e).__name__}: {str(e)[:80]})") from e
    media = [m for m in desc.media if m.kind in ("audio", "video")]
    if not media:
        raise ValueError("the offer has no audio or video section")
    if send and not any(m.kind == "audio" and m.direction in ("sendonly", "sendrecv") for m in media):
        raise ValueError("the offer sends no audio (no sendonly/sendrecv audio section)")
    if not send and not any(m.direction in ("recvonly", "sendrecv") for m in media):
        raise ValueError("the offer receives neither audio nor video (no recvonly/sendrecv section)")
    for m in media:
        if m.dtls is None or not m.dtls.fingerprints:
            raise ValueError(f"the {m.kind} section has no a=fingerprint (or no a=setup): DTLS cannot be set up")
        if m.ice is None or not m.ice.usernameFragment:
            raise ValueError(f"the {m.kind} section has no a=ice-ufrag")
    if candidates and not any(c.protocol.lower() == "udp" for m in media for c in m.ice_candidates):
        raise ValueError("the offer has no UDP ICE candidate (gather candidates before sending the offer)")


def parse_ice_servers(specs: list[str]) -> list:
    """``--ice_server URL[,username,credential]`` values -> ``aiortc.RTCIceServer`` list.

    Raises:
        ValueError: a URL that is not ``stun:``, ``turn:`` or ``turns:``.
    """
    from aiortc import RTCIceServer

    servers = []
    for spec in specs:
        url, _, rest = spec.partition(",")
        username, _, credential = rest.partition(",")
        if not url.startswith(("stun:", "turn:", "turns:")):
            raise ValueError(f"--ice_server {url!r}: expected a stun:, turn: or turns: URL")
        servers.append(RTCIceServer(urls=url, username=username or None, credential=credential or None))
    return servers


def use_loopback_ice() -> None:
    """Make aiortc offer 127.0.0.1 as its host candidate.

    aioice leaves loopback out of its host candidates, so a server and a client on
    one machine (tests, local demos) find no common candidate. Only used when the
    server listens on a loopback address.
    """
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


# aiortc's audio receiver releases a packet only once 4 later ones have arrived
# (RTCRtpReceiver: JitterBuffer(capacity=16, prefetch=4)), holding the microphone
# 80-100 ms before the VAD or the live-speech path sees it. The microphone is not
# played out here (the live-speech path has its own playout), so only reordering
# needs absorbing: 1 packet (20 ms) puts a packet that overtook its predecessor
# back in order and saves ~60 ms of barge-in and turn latency (bench/converse.py:
# barge-in p95 105 ms with 2 packets).
MIC_PREFETCH_PACKETS = 1


def shorten_receive_buffer(pc, track, packets: int = MIC_PREFETCH_PACKETS) -> bool:
    """Hold ``track``'s incoming audio for ``packets`` later packets (not aiortc's 4).

    Reaches into aiortc's receiver (its private jitter buffer; checked against
    aiortc 1.16): returns False, changing nothing, when the receiver or its buffer
    is not found (another aiortc version), so the default simply stays.
    """
    for receiver in pc.getReceivers():
        if receiver.track is track:
            buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
            if buffer is not None and hasattr(buffer, "_prefetch"):
                buffer._prefetch = max(1, int(packets))
                return True
    return False


# Video codec preference (issue #10). aiortc answers with the codecs in the offer's order
# unless the transceiver has preferences; the first one is the one it encodes.
VIDEO_CODEC_MIME = {"vp8": "video/VP8", "h264": "video/H264"}
RTX_MIME = "video/rtx"
# `auto` = VP8, the cheaper encoder measured by bench/codec.py (docs/benchmarks.md, "Video
# codec cost (issue #10)"): on the default avatar (512x512, 25 fps, a talking mouth), aiortc
# 1.16's own encoders at their start bitrates, this 2-core CPU, 5 runs: VP8 1.4-2.0 ms of
# process CPU per frame at 494 kbit/s, H.264 (libx264) 4.9-6.1 ms at 709 kbit/s: ~3x the
# CPU per stream (~20 vs ~7 streams per core). Both hold the GIL only ~0.1 ms per frame.
AUTO_VIDEO_CODEC = "vp8"


def offered_video_codecs(sdp: str) -> set[str]:
    """Lower-case MIME types (``video/vp8``, ``video/h264``, ``video/rtx``...) that the
    video sections of the offer ``sdp`` carry (empty when it has no video section).

    Raises:
        ValueError: an SDP aiortc cannot parse (``check_offer`` refuses those first).
    """
    from aiortc.sdp import SessionDescription

    desc = SessionDescription.parse(sdp)
    return {c.mimeType.lower() for m in desc.media if m.kind == "video" for c in m.rtp.codecs}


def prefer_video_codec(pc, sender, preference: str, offer_sdp: str) -> list[str]:
    """Put the preferred video codec first on ``sender``'s transceiver, before the offer is applied.

    ``preference``: ``auto`` (``AUTO_VIDEO_CODEC``, the cheaper to encode), ``vp8`` or
    ``h264``. The transceiver's preferences (``RTCRtpTransceiver.setCodecPreferences``
    over ``RTCRtpSender.getCapabilities("video")``) become: the preferred codec, then
    aiortc's other video codecs, keeping only those the offer carries, so a client that
    offers only the other codec still gets it; RTX stays when offered (aiortc pairs it
    with each kept codec). Call it after ``pc.addTrack`` and before
    ``pc.setRemoteDescription``. Returns the MIME types in preference order (empty when
    the offer has no video or nothing in common: the preferences are then left alone).

    Raises:
        ValueError: an unknown ``preference``, or no transceiver for ``sender``.
    """
    from aiortc import RTCRtpSender

    if preference == "auto":
        preference = AUTO_VIDEO_CODEC
    if preference not in VIDEO_CODEC_MIME:
        raise ValueError(f"video codec must be 'auto', 'vp8' or 'h264', got {str(preference)[:20]!r}")
    transceiver = next((t for t in pc.getTransceivers() if t.sender is sender), None)
    if transceiver is None:
        raise ValueError("the sender belongs to no transceiver of this peer connection")
    offered = offered_video_codecs(offer_sdp)
    first = VIDEO_CODEC_MIME[preference].lower()
    capabilities = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() in offered]
    ordered = sorted(capabilities, key=lambda c: c.mimeType.lower() != first)  # stable: aiortc's order otherwise
    if not any(c.mimeType.lower() != RTX_MIME for c in ordered):
        return []
    transceiver.setCodecPreferences(ordered)
    return [c.mimeType for c in ordered]
