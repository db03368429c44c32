"""Per-session pipeline metrics, exposed at ``GET /metrics`` (Prometheus text format).

Stage latencies are measured from the moment a unit's audio entered the session
(``t_in``) to the end of each stage: ``features`` (ASR thread), ``model``
(inference thread), ``composite`` (compositing thread), ``sent`` (handed to the
video track on the session clock). Counters track frames sent, dropped (stale,
skipped to keep pace), late (sent more than half a frame after their due time),
playout underruns and interrupts. Per-session series are removed when the
session closes, so closed sessions do not accumulate.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("features", "model", "composite", "sent")
# Buckets (s) spanning one frame (0.04) to the multi-second delays of older servers.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The server's metric registry; one :class:`SessionMetrics` per session."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_latency = Histogram(
            "avatar_stage_latency_seconds",
            "Time from audio entering the session to the end of a pipeline stage",
            ["session", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.video_frames = Counter("avatar_video_frames_sent", "Video frames sent", ["session"], registry=r)
        self.speech_frames = Counter("avatar_speech_frames_sent", "Video frames sent with user audio", ["session"], registry=r)
        self.audio_chunks = Counter("avatar_audio_chunks_sent", "20 ms audio chunks sent", ["session"], registry=r)
        self.dropped = Counter("avatar_video_frames_dropped", "Stale video frames skipped", ["session"], registry=r)
        self.late = Counter("avatar_video_frames_late", "Video frames sent > 20 ms after due", ["session"], registry=r)
        self.underruns = Counter("avatar_playout_underruns", "Idle slots inserted inside speech", ["session"], registry=r)
        self.interrupts = Counter("avatar_interrupts", "Interrupts handled", ["session"], registry=r)
        self.lateness = Histogram(
            "avatar_video_lateness_seconds",
            "How long after its due time on the session clock each video frame was handed to the encoder",
            ["session"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
            registry=r,
        )
        self.sessions = Gauge("avatar_sessions", "Open sessions", registry=r)
        self.closed = Counter("avatar_sessions_closed", "Sessions closed, by reason", ["reason"], registry=r)
        self.closed_reasons: dict[str, int] = {}
        self._per_session = (
            self.video_frames,
            self.speech_frames,
            self.audio_chunks,
            self.dropped,
            self.late,
            self.underruns,
            self.interrupts,
            self.lateness,
        )

    def session(self, session_id: str) -> "SessionMetrics":
        return SessionMetrics(self, session_id)

    def remove(self, session_id: str) -> None:
        """Drop every series of a closed session."""
        for metric in self._per_session:
            try:
                metric.remove(session_id)
            except KeyError:
                pass
        for stage in STAGES:
            try:
                self.stage_latency.remove(session_id, stage)
            except KeyError:
                pass

    def session_closed(self, reason: str) -> None:
        """Count a closed session: peer_closed, ice_failed, connect_timeout, peer_silent, shutdown, bad_offer."""
        self.closed.labels(reason).inc()
        self.closed_reasons[reason] = self.closed_reasons.get(reason, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SessionMetrics:
    """Metric children bound to one session, plus plain counts for status and tests."""

    def __init__(self, metrics: Metrics, session_id: str) -> None:
        self.session_id = session_id
        self._stage = {s: metrics.stage_latency.labels(session_id, s) for s in STAGES}
        self._video = metrics.video_frames.labels(session_id)
        self._speech = metrics.speech_frames.labels(session_id)
        self._audio = metrics.audio_chunks.labels(session_id)
        self._dropped = metrics.dropped.labels(session_id)
        self._late = metrics.late.labels(session_id)
        self._underruns = metrics.underruns.labels(session_id)
        self._interrupts = metrics.interrupts.labels(session_id)
        self._lateness = metrics.lateness.labels(session_id)
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_late = 0
        self.audio_chunks_sent = 0
        self.speech_frames_sent = 0

    def observe_stages(self, t_in: float, stamps: dict[str, float]) -> None:
        """Record ``stamps[stage] - t_in`` (s) for each stage present."""
        for stage, t in stamps.items():
            child = self._stage.get(stage)
            if child is not None:
                child.observe(max(0.0, t - t_in))

    def video_sent(self, speech: bool, late: bool, lateness: float = 0.0) -> None:
        """Count a sent video frame; ``lateness`` (s) after its due time."""
        self.frames_sent += 1
        self._lateness.observe(max(0.0, lateness))
        self._video.inc()
        if speech:
            self.speech_frames_sent += 1
            self._speech.inc()
        if late:
            self.frames_late += 1
            self._late.inc()

    def audio_sent(self) -> None:
        self.audio_chunks_sent += 1
        self._audio.inc()

    def video_dropped(self, n: int) -> None:
        self.frames_dropped += n
        self._dropped.inc(n)

    def underrun(self, n: int = 1) -> None:
        self._underruns.inc(n)

    def interrupted(self) -> None:
        self._interrupts.inc()

    def summary(self) -> dict[str, int]:
        return {
            "frames_sent": self.frames_sent,
            "frames_dropped": self.frames_dropped,
            "frames_late": self.frames_late,
            "audio_chunks_sent": self.audio_chunks_sent,
            "speech_frames_sent": self.speech_frames_sent,
        }
