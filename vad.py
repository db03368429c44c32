"""Voice activity, user turns and the avatar's echo, for voice conversations.

The microphone of a ``"mic": "converse"`` session arrives as live 16 kHz float32
audio. :class:`TurnDetector` runs silero-vad over it, 32 ms at a time, and turns
the per-frame speech probabilities into events (:class:`TurnEvent`):

* ``speech_start`` -- the first frame of a user's speech (drives barge-in: it is
  returned by the :meth:`TurnDetector.feed` call that completes that frame);
* ``turn_end`` -- the speech was followed by ``min_silence_ms`` of silence: the
  turn's audio (with ``speech_pad_ms`` either side) goes to speech-to-text;
* ``turn_discarded`` -- the speech that started was shorter than
  ``min_speech_ms`` (a cough, a click silero took for speech, an "uh"): no turn.

The avatar's own voice, played by the user's speakers and picked up again by the
microphone, is speech too. The browser's echo cancellation removes most of it;
:class:`EchoGuard` catches what is left. It holds the audio the avatar *sent*
(the reference) next to the microphone audio and decides, with
:func:`analyze_echo`, whether the microphone's recent energy is explained by a
delayed, attenuated, filtered and reverberated copy of the reference. A
:class:`TurnDetector` given an ``EchoGuard`` emits ``speech_start`` only for
speech that is not explained that way, so the avatar's echo cannot barge in,
while a real second voice over the echo still can.

Everything here is plain numpy plus one small ONNX model (silero-vad's, run by
onnxruntime with one thread; the torch JIT model when onnxruntime is missing).
Measured on this project's 2-core CPU: ~3 ms of CPU per second of audio for
the VAD, and ~0.7 ms per echo check, one per 32 ms speech frame while the
avatar's echo is heard (~25 ms of CPU per second of it in all). A detector is not thread-safe: feed it from one
thread. An ``EchoGuard`` may be fed its reference from another thread.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "VAD_FRAME_SAMPLES",
    "VAD_FRAME_MS",
    "SileroVAD",
    "TurnEvent",
    "TurnDetector",
    "EchoVerdict",
    "EchoGuard",
    "analyze_echo",
]

# ---------------------------------------------------------------------------
# Constants (units in the names; each one's source next to it)
# ---------------------------------------------------------------------------

# silero-vad v5/v6 at 16 kHz takes exactly 512 new samples per call, preceded by
# the last 64 samples of the previous call (silero_vad.utils_vad.OnnxWrapper).
VAD_FRAME_SAMPLES = 512
VAD_FRAME_MS = VAD_FRAME_SAMPLES * 1000 // SAMPLE_RATE  # 32 ms
VAD_CONTEXT_SAMPLES = 64
VAD_STATE_SHAPE = (2, 1, 128)  # the ONNX model's recurrent state input
# Speech probability at or above which a frame is speech: silero's default
# (VADIterator / get_speech_timestamps threshold=0.5). Its own noise rejection is
# strong: white/pink noise, clicks, thumps and beeps at -6..-35 dBFS stay < 0.25.
DEFAULT_THRESHOLD = 0.5
# Hysteresis: a frame is silence below threshold - 0.15 (silero's neg_threshold).
NEG_THRESHOLD_GAP = 0.15
# Shortest speech that makes a turn: silero's get_speech_timestamps default.
DEFAULT_MIN_SPEECH_MS = 250
# Silence that ends a turn: the brief's 500-700 ms window; LiveKit's endpointing
# (min_endpointing_delay 0.5 s) and Pipecat (stop_secs 0.8 s) sit either side.
DEFAULT_MIN_SILENCE_MS = 600
# Audio kept either side of a turn for speech-to-text. silero's default is 30 ms;
# 150 ms also covers soft onsets (a breath, an /s/), which silero flags up to
# ~120 ms after they begin (p90 over sun.wav phrases and piper/espeak sentences,
# onset = first 5 ms within 30 dB of the clip's peak).
DEFAULT_SPEECH_PAD_MS = 150
# Longest turn: Whisper's 30 s input window; a longer turn is cut into turns.
DEFAULT_MAX_TURN_MS = 30_000
# An echo-only stretch ends after this much silence (same hysteresis as speech).
ECHO_RELEASE_MS = 160

# Echo analysis: a short-time spectrum (16 ms Hann windows every 8 ms, so an
# 8 ms delay resolution) summed into 15 bands from 125 Hz to 8 kHz.
ECHO_WIN_SAMPLES = 256
ECHO_HOP_SAMPLES = 128
ECHO_HOP_MS = ECHO_HOP_SAMPLES * 1000 / SAMPLE_RATE  # 8.0 ms
# Band edges in FFT bins of 62.5 Hz: roughly third-octave above 500 Hz.
ECHO_BAND_EDGES = np.array([2, 4, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 64, 80, 100, 129])
# Echo delays searched: 0-800 ms, as the server sees them: the page's jitter buffer
# and output device (a Bluetooth speaker adds 150-250 ms), the acoustic path, the
# input device and the server's own receive jitter buffer (aiortc: 4 packets,
# 80-100 ms). An aiortc client echoing what it received (bench/converse.py)
# measured 280-580 ms (more on a loaded machine); 500 let the longest through.
DEFAULT_MAX_DELAY_MS = 800
# Microphone history the echo path (delay, per-band gain) is estimated on.
DEFAULT_ECHO_WINDOW_MS = 1000
# The stretch of microphone audio judged: the newest 2 VAD frames.
DEFAULT_RECENT_MS = 64
# Predicted echo is scaled up by this margin before it is compared with the mic
# (absorbs frame misalignment and the gain estimate's spread; 6 dB = x4 power).
DEFAULT_MARGIN_DB = 6.0
# The mic's log band energies must correlate this well with the delayed
# reference for the echo model to be trusted (synthetic echo alone: 0.65-0.98,
# lowest at the avatar's first onset; a voice with no echo: ~0-0.2).
DEFAULT_MIN_CORRELATION = 0.35
# An "echo" louder than what was sent is not a laptop speaker's echo (10-25 dB
# below it is typical; the browser's AGC can lift it some), so it is not trusted.
DEFAULT_MIN_ERL_DB = 0.0
# Recent mic energy that is more than this fraction unexplained is a voice.
# Echo alone stays under ~0.25 on the synthetic grid of tests/test_vad.py; 0.5
# missed a voice at the echo's level twice as often, 0.25 let echo through.
DEFAULT_MAX_UNEXPLAINED = 0.35
# Per-band gain = this percentile of mic/reference power ratios over frames
# where the reference is active: the median, robust to a few double-talk frames.
GAIN_PERCENTILE = 50
# Reference audio needed before an echo model is fitted at all (before that,
# the avatar has just started and speech is taken for its echo): 25 hops, about
# a syllable. Without it, mic audio arriving in 60-120 ms bursts made the very
# first echo onset of a session look like a voice (2 of 24 synthetic runs).
ECHO_FIT_MIN_MS = 200
# Before any echo delay has been confirmed (a session's first speech), the echo may
# arrive up to DEFAULT_MAX_DELAY_MS after the reference starts: wait for that much
# more before trusting a fit (an aiortc client's echo, ~300 ms late, barged in at
# the session's first reply with 200 ms).
ECHO_FIT_MIN_FIRST_MS = ECHO_FIT_MIN_MS + DEFAULT_MAX_DELAY_MS
# Delays whose correlation is within this of the best are all tried (a soft
# onset gives a broad peak); the one that explains the most energy is used.
CANDIDATE_CORRELATION_SPAN = 0.15
# A verdict of echo with at least this correlation confirms its delay for later checks.
PRIOR_CORRELATION = 0.7
# Room reverberation: the reference envelope decays by at most 1 dB per 8 ms
# hop (RT60 ~ 480 ms, a furnished room), so a tail after a word is explained.
REVERB_DECAY_DB_PER_HOP = 1.0
# Levels (mean square per frame) below which there is nothing to judge:
# -60 dBFS for the reference being active, -65 dBFS for unexplained mic energy.
REF_ACTIVE_POWER = 1e-6
UNEXPLAINED_FLOOR_POWER = 10 ** (-65 / 10)
_EPS_POWER = 1e-9  # -90 dBFS: log floor


# ---------------------------------------------------------------------------
# silero-vad: one probability per 32 ms frame
# ---------------------------------------------------------------------------


def _silero_data_dir() -> Path:
    """The ``silero_vad/data`` folder, found without importing the package.

    Importing ``silero_vad`` runs ``torch.set_num_threads(1)`` for the whole
    process (its model.py), which would slow this server's other torch work.

    Raises:
        RuntimeError: silero-vad is not installed.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed: pip install silero-vad")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


_ONNX_LOCK = threading.Lock()
_ONNX_SESSION = None


def _onnx_session():
    """One shared onnxruntime session (thread-safe to run; state is an input)."""
    global _ONNX_SESSION
    with _ONNX_LOCK:
        if _ONNX_SESSION is None:
            import onnxruntime

            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1  # a 32 ms frame is ~0.1 ms: threads only add overhead
            opts.inter_op_num_threads = 1
            path = _silero_data_dir() / "silero_vad.onnx"
            _ONNX_SESSION = onnxruntime.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        return _ONNX_SESSION


class SileroVAD:
    """silero-vad's speech probability for consecutive 512-sample frames.

    Uses the package's ONNX model through onnxruntime (one session shared by all
    instances, each instance holding its own recurrent state), or its torch JIT
    model when onnxruntime is not installed.

    Raises:
        RuntimeError: silero-vad is not installed.
    """

    def __init__(self) -> None:
        self._jit = None
        try:
            self._session = _onnx_session()
        except ImportError:
            import torch

            self._session = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still works
                self._jit = torch.jit.load(str(_silero_data_dir() / "silero_vad.jit"), map_location="cpu")
            self._jit.eval()
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    @property
    def backend(self) -> str:
        """"onnx" or "jit"."""
        return "jit" if self._jit is not None else "onnx"

    def reset(self) -> None:
        """Forget the stream so far (recurrent state and context)."""
        self._state = np.zeros(VAD_STATE_SHAPE, np.float32)
        self._context = np.zeros(VAD_CONTEXT_SAMPLES, np.float32)
        if self._jit is not None:
            self._jit.reset_states()

    def __call__(self, frame: np.ndarray) -> float:
        """Speech probability in [0, 1] of the next frame.

        Args:
            frame: float32 (512,) at 16 kHz, values in [-1, 1], continuing the
                frames given before.

        Raises:
            ValueError: the frame is not 512 samples.
        """
        frame = np.asarray(frame, dtype=np.float32).reshape(-1)
        if frame.shape[0] != VAD_FRAME_SAMPLES:
            raise ValueError(f"silero-vad takes {VAD_FRAME_SAMPLES} samples per frame, got {frame.shape[0]}")
        if self._jit is not None:
            import torch

            with torch.no_grad():
                return float(self._jit(torch.from_numpy(frame.copy()), SAMPLE_RATE).item())
        x = np.concatenate([self._context, frame])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = frame[-VAD_CONTEXT_SAMPLES:].copy()
        return float(out[0, 0])


# ---------------------------------------------------------------------------
# Echo: is the mic's speech explained by what the avatar sent?
# ---------------------------------------------------------------------------

_WINDOW = np.hanning(ECHO_WIN_SAMPLES + 2)[1:-1]  # periodic-free Hann without zero ends
# Scale so that a frame's bands sum to about its mean square (dBFS-comparable).
_POWER_SCALE = 2.0 / (ECHO_WIN_SAMPLES * float(np.sum(_WINDOW**2)))


def _band_powers(x: np.ndarray) -> np.ndarray:
    """Short-time band powers.

    Args:
        x: float32 (n,) at 16 kHz.

    Returns:
        float64 (frames, bands): frame ``t`` covers ``x[t*128 : t*128 + 256]``;
        ``frames = (n - 256) // 128 + 1`` (0 when n < 256); 15 bands (125 Hz -
        8 kHz); each value a mean-square power (full scale = 1).
    """
    x = np.asarray(x, dtype=np.float32)
    n = (len(x) - ECHO_WIN_SAMPLES) // ECHO_HOP_SAMPLES + 1
    if n <= 0:
        return np.zeros((0, len(ECHO_BAND_EDGES) - 1))
    frames = np.lib.stride_tricks.sliding_window_view(x, ECHO_WIN_SAMPLES)[::ECHO_HOP_SAMPLES][:n]
    spec = np.fft.rfft(frames * _WINDOW, axis=1)
    p = (spec.real**2 + spec.imag**2)[:, ECHO_BAND_EDGES[0] : ECHO_BAND_EDGES[-1]]
    return np.add.reduceat(p, ECHO_BAND_EDGES[:-1] - ECHO_BAND_EDGES[0], axis=1) * _POWER_SCALE


@dataclass(frozen=True)
class EchoVerdict:
    """What :func:`analyze_echo` found.

    Attributes:
        is_echo: the recent mic energy is explained by the reference's echo.
        reason: one line saying why (for logs and tests).
        delay_ms: estimated echo delay (mic after reference), ms; None when no
            echo model was fitted.
        erl_db: echo return loss, dB: how far the fitted echo is below the
            reference (a laptop's speaker-to-mic path: ~10-25 dB); None as above.
        correlation: correlation of the mic's and the delayed reference's log
            band energies, -1..1 (0 when not computed).
        unexplained: fraction (0..1) of the recent mic energy that the echo
            model does not explain (1.0 when no model was fitted).
    """

    is_echo: bool
    reason: str
    delay_ms: Optional[float] = None
    erl_db: Optional[float] = None
    correlation: float = 0.0
    unexplained: float = 1.0


def _log_decaying_peak(lr: np.ndarray, db_per_hop: float) -> np.ndarray:
    """Per band, the reverberant envelope ``e[t] = max_{s<=t} r[s] * decay**(t-s)``.

    In log10 power: ``max_{s<=t}(lr[s] + a*s) - a*t`` with ``a = db_per_hop/10``,
    a cumulative maximum (exact, no loop). lr: (T, B) -> (T, B).
    """
    a = db_per_hop / 10.0
    ramp = a * np.arange(len(lr), dtype=np.float64)[:, None]
    return np.maximum.accumulate(lr + ramp, axis=0) - ramp


def _nan_percentile(x: np.ndarray, q: int, axis: int) -> np.ndarray:
    """The lower q-th percentile along axis, ignoring NaN (NaN where all are).

    np.nanpercentile loops in Python per lane; sorting (NaN sort last) is ~10x faster.
    """
    x = np.sort(x, axis=axis)
    count = (~np.isnan(x)).sum(axis=axis, keepdims=True)
    pick = np.maximum(count - 1, 0) * q // 100
    out = np.take_along_axis(x, pick, axis=axis)
    return np.squeeze(np.where(count > 0, out, np.nan), axis=axis)


def _verdict(
    mic_p: np.ndarray,
    ref_p: np.ndarray,
    lags: int,
    recent: int,
    margin_db: float,
    min_correlation: float,
    min_erl_db: float,
    max_unexplained: float,
    prior_lag: Optional[int] = None,
) -> EchoVerdict:
    """The echo decision on band powers; mic_p (T, B), ref_p (T + lags, B), ends aligned.

    Lag k (in 8 ms hops) pairs mic frame t with reference frame t + lags - k.
    """
    n = len(mic_p)
    if n == 0 or len(ref_p) != n + lags:
        return EchoVerdict(False, "not enough audio to judge")
    recent = max(1, min(recent, n))
    if not (ref_p.sum(axis=1) > REF_ACTIVE_POWER).any():
        return EchoVerdict(False, "the avatar sent nothing audible")
    mic_recent = mic_p[-recent:]
    total = float(mic_recent.sum())
    ref_active_ms = int((ref_p.sum(axis=1) > REF_ACTIVE_POWER).sum()) * ECHO_HOP_MS
    if ref_active_ms < (ECHO_FIT_MIN_MS if prior_lag is not None else ECHO_FIT_MIN_FIRST_MS):
        # The avatar has only just started: too little of its echo to fit a
        # model to, so speech now is taken for echo (a user who really started
        # speaking is found once the model fits, ECHO_FIT_MIN_MS later at most).
        return EchoVerdict(True, f"the avatar started {ref_active_ms:.0f} ms ago: too early to tell its echo apart")

    def by_lag(x: np.ndarray) -> np.ndarray:
        """(T + lags, B) -> (lags + 1, T, B): [k] is x delayed by k hops, aligned with the mic."""
        win = np.lib.stride_tricks.sliding_window_view(x, n, axis=0)  # (lags + 1, B, T)
        return np.moveaxis(win[::-1], 2, 1)

    def widen(x: np.ndarray) -> np.ndarray:
        """Max over lags k-1, k, k+1 (fractional delays, jitter)."""
        out = x.copy()
        np.maximum(out[1:], x[:-1], out=out[1:])
        np.maximum(out[:-1], x[1:], out=out[:-1])
        return out

    # Delay: correlate the mic's log band energies (each band's mean removed)
    # with the reference's at every lag.
    lm = np.log10(mic_p + _EPS_POWER)
    lr = np.log10(ref_p + _EPS_POWER)
    lm = lm - lm.mean(axis=0)
    seg = by_lag(lr)
    seg = seg - seg.mean(axis=1, keepdims=True)
    num = np.einsum("tb,ktb->k", lm, seg)
    den = np.sqrt(float((lm * lm).sum()) * np.einsum("ktb,ktb->k", seg, seg))
    corr = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    best_k = int(np.argmax(corr))
    best_c = float(corr[best_k])
    if best_c < min_correlation:
        return EchoVerdict(
            False,
            f"the mic does not follow the reference (correlation {best_c:.2f})",
            best_k * ECHO_HOP_MS,
            None,
            best_c,
        )
    # Candidate delays: every other lag whose correlation is near the best (a
    # soft onset makes the peak broad; widening covers the lags skipped) and
    # the delay last confirmed on this stream. The one explaining most wins.
    cands = [k for k in range(0, lags + 1, 2) if corr[k] >= max(min_correlation, best_c - CANDIDATE_CORRELATION_SPAN)]
    cands = sorted(set(cands) | {best_k} | ({prior_lag} if prior_lag is not None and 0 <= prior_lag <= lags else set()))
    cands_a = np.array(cands)

    # The echo path per candidate: per-band gain of the direct path, the median
    # mic/reference power ratio where the delayed reference is active.
    direct = widen(by_lag(ref_p))[cands_a]  # (C, T, B)
    active = direct > REF_ACTIVE_POWER / len(ECHO_BAND_EDGES)
    ratios = np.where(active, mic_p[None] / np.where(active, direct, 1.0), np.nan)
    gains = _nan_percentile(ratios, GAIN_PERCENTILE, axis=1)  # (C, B)
    # A band the reference never reached takes the median gain of the others.
    gains = np.where(np.isnan(gains), _nan_percentile(gains, 50, axis=1)[:, None], gains)
    usable = ~np.isnan(gains).all(axis=1)
    if not usable.any():
        return EchoVerdict(False, "no reference energy at the estimated delay", best_k * ECHO_HOP_MS, None, best_c)
    gains = np.where(np.isnan(gains), 0.0, gains)
    ref_energy = np.where(active, direct, 0.0).sum(axis=(1, 2))
    echo_energy = np.where(active, direct * gains[:, None, :], 0.0).sum(axis=(1, 2))
    with np.errstate(divide="ignore"):
        erl = 10 * np.log10(np.maximum(ref_energy, 1e-30) / np.maximum(echo_energy, 1e-30))
    # Predicted echo: that gain on the reverberant envelope of the reference
    # (its decaying peak), so a room's tail after a word is explained too.
    env = widen(by_lag(10 ** _log_decaying_peak(lr, REVERB_DECAY_DB_PER_HOP)))[cands_a][:, -recent:]
    echo = env * gains[:, None, :] * 10 ** (margin_db / 10)
    # Unexplained: recent mic energy above that echo and the mic's noise floor
    # (10th percentile per band over the window).
    floor = np.percentile(mic_p, 10, axis=0)
    excess = np.maximum(mic_recent[None] - echo - floor, 0.0).sum(axis=(1, 2))  # (C,)
    plausible = usable & (erl >= min_erl_db)
    if not plausible.any():
        i = int(np.argmax(np.where(usable, erl, -np.inf)))
        return EchoVerdict(
            False,
            f"the fitted echo is louder than the reference (ERL {erl[i]:.1f} dB)",
            cands[i] * ECHO_HOP_MS,
            float(erl[i]),
            float(corr[cands[i]]),
        )
    # The candidate explaining the most; among near-ties (within 1 % of the
    # recent energy) the best-correlated, which reports the delay best.
    best_excess = float(np.min(np.where(plausible, excess, np.inf)))
    near = plausible & (excess <= best_excess + 0.01 * total)
    i = int(np.argmax(np.where(near, corr[cands_a], -np.inf)))
    delay_ms, erl_db, c = cands[i] * ECHO_HOP_MS, float(erl[i]), float(corr[cands[i]])
    unexplained = float(excess[i]) / total if total > 0 else 0.0
    if float(excess[i]) / recent < UNEXPLAINED_FLOOR_POWER or unexplained <= max_unexplained:
        return EchoVerdict(
            True, f"explained by the avatar's echo ({unexplained:.0%} unexplained)", delay_ms, erl_db, c, unexplained
        )
    reason = f"a voice over the echo ({unexplained:.0%} unexplained)"
    return EchoVerdict(False, reason, delay_ms, erl_db, c, unexplained)


def _lags(max_delay_ms: float) -> int:
    return int(math.ceil(max_delay_ms / ECHO_HOP_MS))


def analyze_echo(
    mic: np.ndarray,
    ref: np.ndarray,
    *,
    recent_ms: float = DEFAULT_RECENT_MS,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    margin_db: float = DEFAULT_MARGIN_DB,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
    min_erl_db: float = DEFAULT_MIN_ERL_DB,
    max_unexplained: float = DEFAULT_MAX_UNEXPLAINED,
) -> EchoVerdict:
    """Decide whether the newest mic audio is only the avatar's echo.

    The echo model: the mic holds the reference delayed by 0..``max_delay_ms``,
    filtered (any per-band gain, e.g. a small speaker's low-pass) and
    reverberated (RT60 up to ~0.5 s), plus noise. Its delay is the lag that
    best correlates the two signals' log band energies over the whole window;
    its per-band gain is the median mic/reference power ratio where the
    reference is active. The newest ``recent_ms`` of mic is echo when at most
    ``max_unexplained`` of its energy exceeds the predicted echo (scaled up by
    ``margin_db``) plus the noise floor. Not echo when the reference is silent,
    when the correlation is below ``min_correlation`` (the mic does not follow
    the reference), or when the fitted echo is louder than the reference (ERL
    below ``min_erl_db``).

    Args:
        mic: float32 (n,) 16 kHz microphone audio, the newest sample last;
            ~1 s is a good window (at least ``recent_ms``).
        ref: float32 (n + ceil(max_delay_ms / 8) * 128,) 16 kHz: the audio the
            avatar sent, ending at the same instant as ``mic`` (so it also
            covers the ``max_delay_ms`` before the mic window). Silence counts:
            pass zeros for times the avatar sent silence.
        recent_ms: the newest stretch of mic judged, ms.
        max_delay_ms: longest echo delay searched, ms.
        margin_db: headroom over the predicted echo, dB.
        min_correlation: least correlation that trusts the echo model.
        min_erl_db: least echo return loss that trusts the echo model, dB.
        max_unexplained: largest unexplained energy fraction still called echo.

    Returns:
        an :class:`EchoVerdict`.

    Raises:
        ValueError: ``ref`` does not have the length above.
    """
    lags = _lags(max_delay_ms)
    mic = np.asarray(mic, dtype=np.float32).reshape(-1)
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    if len(ref) != len(mic) + lags * ECHO_HOP_SAMPLES:
        raise ValueError(
            f"ref must hold {lags * ECHO_HOP_SAMPLES} samples more than mic "
            f"(max_delay_ms={max_delay_ms} rounded up to 8 ms hops), got {len(ref)} for {len(mic)}"
        )
    if len(mic) < ECHO_WIN_SAMPLES:
        return EchoVerdict(False, "not enough audio to judge")
    # Frame both from their ends so that frame t of each covers the same instant.
    usable = (len(mic) - ECHO_WIN_SAMPLES) // ECHO_HOP_SAMPLES * ECHO_HOP_SAMPLES + ECHO_WIN_SAMPLES
    mic = mic[len(mic) - usable :]
    ref = ref[len(ref) - usable - lags * ECHO_HOP_SAMPLES :]
    recent = int(math.ceil(recent_ms / ECHO_HOP_MS))
    return _verdict(
        _band_powers(mic), _band_powers(ref), lags, recent, margin_db, min_correlation, min_erl_db, max_unexplained
    )


class _BandRing:
    """Band powers of a live stream: frames computed as samples arrive, newest last."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._tail = np.zeros(0, np.float32)  # samples not yet in a full hop
        self._frames: deque[np.ndarray] = deque(maxlen=max_frames)
        self._arr: Optional[np.ndarray] = None

    def push(self, pcm: np.ndarray) -> None:
        x = np.concatenate([self._tail, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        p = _band_powers(x)
        self._frames.extend(p)
        used = len(p) * ECHO_HOP_SAMPLES
        self._tail = x[used:] if len(p) else x
        self._arr = None

    def last(self, n: int) -> np.ndarray:
        """The newest n frames (B columns), zero-filled at the front if fewer."""
        if self._arr is None:
            self._arr = np.array(self._frames) if self._frames else np.zeros((0, len(ECHO_BAND_EDGES) - 1))
        have = self._arr[-n:] if n else self._arr[:0]
        if len(have) < n:
            have = np.concatenate([np.zeros((n - len(have), len(ECHO_BAND_EDGES) - 1)), have])
        return have

    def __len__(self) -> int:
        return len(self._frames)


class EchoGuard:
    """Live echo check: the avatar's sent audio next to the microphone's.

    Feed :meth:`push_reference` with every chunk the avatar's audio track sends
    (silence included, so the stream stays continuous) and :meth:`push_mic`
    with the microphone audio as it arrives (a :class:`TurnDetector` given this
    guard does that itself). Both must be fed in real time: the two streams are
    aligned at their newest samples, and the echo delay search (0 to
    ``max_delay_ms``) absorbs the difference in when their chunks arrive (the
    mic, which arrives in network bursts, may lag by up to ``max_delay_ms``
    minus the real echo delay). Band powers are computed once per 8 ms as
    audio arrives, so :meth:`check` only fits the echo model (~0.7 ms).

    Args:
        max_delay_ms, margin_db, min_correlation, min_erl_db, max_unexplained:
            as in :func:`analyze_echo`.
        window_ms: mic history the echo model is fitted on, ms.
    """

    def __init__(
        self,
        *,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
        window_ms: float = DEFAULT_ECHO_WINDOW_MS,
        margin_db: float = DEFAULT_MARGIN_DB,
        min_correlation: float = DEFAULT_MIN_CORRELATION,
        min_erl_db: float = DEFAULT_MIN_ERL_DB,
        max_unexplained: float = DEFAULT_MAX_UNEXPLAINED,
    ) -> None:
        self.lags = _lags(max_delay_ms)
        self.window = max(1, int(round(window_ms / ECHO_HOP_MS)))
        self.margin_db = margin_db
        self.min_correlation = min_correlation
        self.min_erl_db = min_erl_db
        self.max_unexplained = max_unexplained
        self._lock = threading.Lock()
        self._ref = _BandRing(self.window + self.lags)
        self._mic = _BandRing(self.window)
        # The echo delay last confirmed (an echo verdict with a clear correlation),
        # ms: tried as a candidate by later checks. None until then.
        self.delay_ms: Optional[float] = None

    def reset(self) -> None:
        """Forget both streams and the confirmed delay (e.g. a new peer connection)."""
        with self._lock:
            self._ref = _BandRing(self.window + self.lags)
            self._mic = _BandRing(self.window)
            self.delay_ms = None

    def push_reference(self, pcm: np.ndarray) -> None:
        """Audio the avatar sent: float32 (n,) 16 kHz, any n; any thread."""
        with self._lock:
            self._ref.push(pcm)

    def push_mic(self, pcm: np.ndarray) -> None:
        """Microphone audio: float32 (n,) 16 kHz, any n; any thread."""
        with self._lock:
            self._mic.push(pcm)

    def reference_active(self) -> bool:
        """Whether the reference was audible within the window + max delay."""
        with self._lock:
            ref = self._ref.last(self.window + self.lags)
        return bool((ref.sum(axis=1) > REF_ACTIVE_POWER).any())

    def check(self, recent_ms: float = DEFAULT_RECENT_MS) -> EchoVerdict:
        """Judge the newest ``recent_ms`` of mic audio (see :func:`analyze_echo`)."""
        with self._lock:
            n = min(len(self._mic), self.window)
            mic = self._mic.last(n)
            ref = self._ref.last(n + self.lags)
        verdict = _verdict(
            mic,
            ref,
            self.lags,
            int(math.ceil(recent_ms / ECHO_HOP_MS)),
            self.margin_db,
            self.min_correlation,
            self.min_erl_db,
            self.max_unexplained,
            prior_lag=None if self.delay_ms is None else int(round(self.delay_ms / ECHO_HOP_MS)),
        )
        if verdict.is_echo and verdict.correlation >= PRIOR_CORRELATION and verdict.delay_ms is not None:
            self.delay_ms = verdict.delay_ms
        return verdict


# ---------------------------------------------------------------------------
# Turns
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnEvent:
    """One event of :meth:`TurnDetector.feed`.

    Attributes:
        kind: "speech_start", "turn_end" or "turn_discarded".
        time_ms: stream position (ms of audio fed so far) when the event was
            decided: the end of the frame that decided it.
        start_ms: the turn's onset: start of its first speech frame, ms.
        end_ms: end of its last speech frame, ms (None for speech_start).
        audio: turn_end only: float32 (n,) 16 kHz, from ``start_ms -
            speech_pad_ms`` to ``end_ms + speech_pad_ms`` (clipped to the
            stream); None otherwise.
        echo: the echo verdict behind a speech_start (None without a guard).
    """

    kind: str
    time_ms: float
    start_ms: float
    end_ms: Optional[float] = None
    audio: Optional[np.ndarray] = None
    echo: Optional[EchoVerdict] = None

    @property
    def duration_ms(self) -> Optional[float]:
        return None if self.end_ms is None else self.end_ms - self.start_ms


_IDLE, _ECHO, _SPEECH = "idle", "echo", "speech"


class TurnDetector:
    """Streaming user-turn detection on 16 kHz float32 audio, chunks of any size.

    Per 32 ms frame, silero-vad gives a speech probability ``p``. A frame is
    speech when ``p >= threshold``, silence when ``p < threshold - 0.15``.

    * Not in a turn, a speech frame starts one: ``speech_start`` (onset = that
      frame's start) -- unless ``echo`` judges the frame to be the avatar's
      echo; then the stretch is followed frame by frame, and its first frame
      that is not echo starts the turn.
    * In a turn, ``min_silence_ms`` of silence ends it: ``turn_end`` with the
      audio if it lasted (onset to last speech frame) at least
      ``min_speech_ms``, else ``turn_discarded``. A turn reaching
      ``max_turn_ms`` ends there (the next speech frame starts another).

    Args:
        threshold: speech probability of a speech frame (0..1).
        min_speech_ms: shortest speech that makes a turn, ms.
        min_silence_ms: silence that ends a turn, ms.
        speech_pad_ms: audio kept either side of a turn, ms.
        max_turn_ms: longest turn, ms.
        echo: an :class:`EchoGuard` holding the avatar's sent audio, or None.
            The detector pushes the mic audio into it.
        vad: the frame model (default a new :class:`SileroVAD`).

    Raises:
        ValueError: a bad argument. RuntimeError: silero-vad is not installed.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        min_speech_ms: float = DEFAULT_MIN_SPEECH_MS,
        min_silence_ms: float = DEFAULT_MIN_SILENCE_MS,
        speech_pad_ms: float = DEFAULT_SPEECH_PAD_MS,
        max_turn_ms: float = DEFAULT_MAX_TURN_MS,
        echo: Optional[EchoGuard] = None,
        vad: Optional[SileroVAD] = None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if min_speech_ms < 0 or min_silence_ms < VAD_FRAME_MS or speech_pad_ms < 0:
            raise ValueError(
                f"need min_speech_ms >= 0, min_silence_ms >= {VAD_FRAME_MS}, speech_pad_ms >= 0; got "
                f"{min_speech_ms!r}, {min_silence_ms!r}, {speech_pad_ms!r}"
            )
        if max_turn_ms < max(min_speech_ms, VAD_FRAME_MS):
            raise ValueError(f"max_turn_ms must be >= min_speech_ms and one frame, got {max_turn_ms!r}")
        self.threshold = threshold
        self.neg_threshold = max(threshold - NEG_THRESHOLD_GAP, 0.01)
        self.min_speech_ms = min_speech_ms
        self.min_silence_ms = min_silence_ms
        self.speech_pad_ms = speech_pad_ms
        self.max_turn_ms = max_turn_ms
        self.echo = echo
        self.vad = vad if vad is not None else SileroVAD()
        self._pad_samples = int(round(speech_pad_ms * SAMPLE_RATE / 1000))
        self.reset()

    def reset(self) -> None:
        """Forget the stream: position 0, no turn in progress."""
        self.vad.reset()
        self._buf = np.zeros(0, np.float32)
        self._pos = 0  # samples run through the model
        self._state = _IDLE
        self._quiet_ms = 0.0
        self._pre: deque[np.ndarray] = deque(maxlen=self._pad_samples // VAD_FRAME_SAMPLES + 2)
        self._turn: list[np.ndarray] = []
        self._turn_start = 0  # sample index of the onset frame
        self._turn_audio_start = 0  # sample index of self._turn[0][0]
        self._last_speech_end = 0
        self.last_probability = 0.0

    @property
    def position_ms(self) -> float:
        """Audio run through the model so far, ms."""
        return self._pos * 1000.0 / SAMPLE_RATE

    @property
    def in_turn(self) -> bool:
        """A turn has started (speech_start sent) and not ended."""
        return self._state == _SPEECH

    def feed(self, pcm: np.ndarray) -> list[TurnEvent]:
        """Run the next microphone audio through the detector.

        Args:
            pcm: float32 (n,) mono 16 kHz in [-1, 1], any n >= 0, continuing
                the stream. Samples not filling a 32 ms frame wait for the next
                call.

        Returns:
            the events decided by this audio, in stream order (often []).
        """
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        events: list[TurnEvent] = []
        n = len(self._buf) // VAD_FRAME_SAMPLES
        for i in range(n):
            ev = self._step(self._buf[i * VAD_FRAME_SAMPLES : (i + 1) * VAD_FRAME_SAMPLES])
            if ev is not None:
                events.append(ev)
        self._buf = self._buf[n * VAD_FRAME_SAMPLES :].copy()
        return events

    def flush(self) -> list[TurnEvent]:
        """The stream ended: close a turn in progress (turn_end or turn_discarded)."""
        if self._state == _SPEECH:
            return [self._end_turn()]
        self._state = _IDLE
        return []

    # -- internals ---------------------------------------------------------

    def _ms(self, samples: int) -> float:
        return samples * 1000.0 / SAMPLE_RATE

    def _step(self, frame: np.ndarray) -> Optional[TurnEvent]:
        frame = frame.copy()
        p = self.vad(frame)
        self.last_probability = p
        if self.echo is not None:
            self.echo.push_mic(frame)
        start = self._pos
        self._pos += VAD_FRAME_SAMPLES
        speech = p >= self.threshold
        silent = p < self.neg_threshold
        if self._state == _SPEECH:
            self._turn.append(frame)
            if speech:
                self._last_speech_end = self._pos
            self._quiet_ms = self._quiet_ms + VAD_FRAME_MS if silent else 0.0 if speech else self._quiet_ms
            if self._quiet_ms >= self.min_silence_ms or self._ms(self._pos - self._turn_start) >= self.max_turn_ms:
                return self._end_turn()
            return None
        if self._state == _ECHO:
            self._quiet_ms = self._quiet_ms + VAD_FRAME_MS if silent else 0.0 if speech else self._quiet_ms
            if self._quiet_ms >= ECHO_RELEASE_MS:
                self._state = _IDLE
        if not speech:
            self._pre.append(frame)
            return None
        verdict = None
        if self.echo is not None:
            verdict = self.echo.check()
            if verdict.is_echo:
                self._state = _ECHO
                self._quiet_ms = 0.0
                self._pre.append(frame)
                return None
        # A turn starts with this frame.
        pre = np.concatenate(list(self._pre)) if self._pre else np.zeros(0, np.float32)
        pre = pre[len(pre) - min(len(pre), self._pad_samples) :]
        self._pre.clear()
        self._turn = [pre, frame]
        self._turn_audio_start = start - len(pre)
        self._turn_start = start
        self._last_speech_end = self._pos
        self._quiet_ms = 0.0
        self._state = _SPEECH
        return TurnEvent("speech_start", self._ms(self._pos), self._ms(start), echo=verdict)

    def _end_turn(self) -> TurnEvent:
        self._state = _IDLE
        self._quiet_ms = 0.0
        whole = np.concatenate(self._turn)
        self._turn = []
        end = self._last_speech_end
        stop = min(end + self._pad_samples, self._turn_audio_start + len(whole))
        audio = whole[: stop - self._turn_audio_start]
        # The newest audio is the next turn's leading pad.
        self._pre.clear()
        tail = whole[max(0, len(whole) - self._pad_samples) :]
        if len(tail):
            self._pre.append(tail)
        start_ms, end_ms = self._ms(self._turn_start), self._ms(end)
        if end_ms - start_ms < self.min_speech_ms:
            return TurnEvent("turn_discarded", self._ms(self._pos), start_ms, end_ms)
        return TurnEvent("turn_end", self._ms(self._pos), start_ms, end_ms, audio=audio)
