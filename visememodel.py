"""The embedded default lip-sync model: acoustic visemes + a landmark-driven mouth warp.

No weights, no GPU. Per 40 ms video frame it measures the level and the spectral
shape of the frame's audio (``audio_features``), maps them to two mouth parameters
(``mouth_shape``: jaw/lip openness and lip spread/rounding), smooths them with an
attack/release filter (``MouthSmoother``) and renders the mouth by warping the lips
and jaw of the avatar frame with ``cv2.remap`` plus a painted mouth interior
(``render_mouth``). Per-frame geometry (region of interest, displacement basis
fields, mouth-line contours) is computed once per avatar source frame and shared by
every session (``_rig``), so a frame costs two map combinations, one remap of the
mouth/jaw region and a small polygon fill.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
from scipy.interpolate import PchipInterpolator

from avatar import Avatar, FacePatch
from basereal import LipSyncModel
from clock import CHUNK_MS, CHUNK_SAMPLES, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "SAMPLE_RATE", "CHUNK_SAMPLES", "FRAME_SAMPLES", "FEATURE_NAMES", "N_FEATURES",
    "audio_features", "mouth_shape", "LevelReference", "MouthSmoother", "render_mouth", "VisemeWarpModel",
]

# ---------------------------------------------------------------------------
# Acoustic features
#
# SAMPLE_RATE = 16000 Hz, CHUNK_SAMPLES = 320 (20 ms), FRAME_SAMPLES = 640 (40 ms,
# one 25 fps video frame): imported from clock.py.

# The level window. Frame s is shown from its pts (s x 40 ms) for 40 ms, and the A/V
# offset (``client.av_offset``, docs/benchmarks.md "A/V offset across voices")
# compares the mouth at each frame's pts with the audio RMS centred on the same
# instant. The level is a weighted RMS over a fixed kernel centred LEVEL_CENTRE_MS
# after the frame's start: weight 1 within LEVEL_CORE_MS / 2 of the centre,
# CONTEXT_WEIGHT for a further LEVEL_CONTEXT_MS on each side (smoother than a bare
# 40 ms window), 0 beyond; the spectral window (SPEC_SAMPLES) has the same centre.
# The kernel does not depend on the context a latency preset gives (it spans
# [LEVEL_CENTRE_MS - 40, LEVEL_CENTRE_MS + 40) ms = [-35, 45) ms from the frame start,
# inside every preset's window; with less context it is cut, not padded).
# Calibration (issue #7, bench/av_offset.py, docs/benchmarks.md): with the centre at
# the frame's middle (20 ms) the mouth read ~10 ms early offline and 10-15 ms early
# at an aiortc client on every voice tried: the centre leads it by 20 ms, the
# attack/release smoothing delays it by ~10 ms, and the Opus path delays the audio a
# client receives by 6.5 ms. The offset moves 1 ms later per 1 ms earlier centre,
# the same on every clip; 5 ms puts the tuning clips (yongen, sun, piper joe, espeak
# en-us) at about +4 ms offline and -2 ms at the client. (A frame is seen for 40 ms
# after its pts: with frames held rather than sampled, the same clips read ~19 ms
# more, i.e. the mouth ~17 ms after the sound; a centre of 15 ms reads ~-12 / +7.)
LEVEL_CENTRE_MS = 5.0  # level / spectrum window centre, ms after the frame's start (pts)
LEVEL_CORE_MS = 40.0  # full-weight span of the level kernel (ms)
LEVEL_CONTEXT_MS = 20.0  # CONTEXT_WEIGHT span on each side of the core (ms)
CONTEXT_WEIGHT = 0.3  # weight of a context sample (vs 1 in the core) in the level
SPEC_SAMPLES = 768  # 48 ms Hann window centred on LEVEL_CENTRE_MS, for the spectrum
N_FFT = 1024  # rFFT size: 15.6 Hz bins
# Band edges (Hz): F0 and the F1 of close vowels (< 300), the F1 range of the other
# vowels (300-1000), F2 (1000-2500), frication noise and upper formants (> 2500).
# Formant ranges: Peterson & Barney (1952) averages, men / women: F1 270-730 /
# 310-850 Hz, F2 840-2290 / 920-2790 Hz; /s/ noise peaks at 4-8 kHz, /sh/ at 2.5-4 kHz.
BAND_EDGES_HZ = (0, 300, 1000, 2500, SAMPLE_RATE // 2 + 1)
# Formant proxies: power centroid of 200-1000 Hz (~F1), and of 700-3500 Hz with the
# power weighted by f (+6 dB/octave, so F2 outweighs the F1 skirt) (~F2). On vowels
# synthesised with Peterson & Barney's formants (F0 110 / 210 Hz) they read F1 within
# ~60 Hz and F2 within ~200 Hz for /i/ /e/ /ae/ /u/ /o/; /a/ (F2 1090) reads ~950 Hz.
F1_BAND_HZ = (200, 1000)
F2_BAND_HZ = (700, 3500)
FEATURE_NAMES = ("level_dbfs", "frac_0_300", "frac_300_1000", "frac_1000_2500", "frac_2500_8000",
                 "centroid_khz", "f1_khz", "f2_khz")
N_FEATURES = len(FEATURE_NAMES)
SILENCE_DBFS = -100.0  # level of an all-zero window (power floor 1e-10)


@lru_cache(maxsize=16)
def _level_weights(n: int, lookbehind: int, centre_ms: float, core_ms: float, context_ms: float,
                   context_weight: float) -> np.ndarray:
    """float32 (n,) weights, summing to 1, for a window of n samples that starts
    ``lookbehind`` samples before the frame: 1 within core_ms / 2 of the point
    centre_ms after the frame start, context_weight within a further context_ms on
    each side, 0 beyond (uniform if nothing of the kernel lies in the window)."""
    d = np.abs((np.arange(n) - lookbehind + 0.5) * (1000.0 / SAMPLE_RATE) - centre_ms)
    w = np.where(d < core_ms / 2, 1.0, np.where(d < core_ms / 2 + context_ms, context_weight, 0.0))
    total = w.sum()
    return (w / total if total > 0 else np.full(n, 1.0 / max(n, 1))).astype(np.float32)


@lru_cache(maxsize=1)
def _spectral_tables():
    """Hann window, per-bin band index, bin frequencies (kHz), F1 / F2 proxy bin slices
    and the F2 proxy's +6 dB/octave weights."""
    khz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE) / 1000.0
    band = np.searchsorted(BAND_EDGES_HZ, khz * 1000.0, side="right") - 1

    def bins(lo_hi):
        return slice(*np.searchsorted(khz * 1000.0, lo_hi))

    f1, f2 = bins(F1_BAND_HZ), bins(F2_BAND_HZ)
    return np.hanning(SPEC_SAMPLES), band, khz, f1, f2, khz[f2] ** 0


def _centroid(p: np.ndarray, khz: np.ndarray) -> float:
    total = p.sum()
    return float(np.dot(p, khz) / total) if total > 1e-20 else 0.0


def audio_features(window: np.ndarray, lookbehind_samples: int, lookahead_samples: int) -> np.ndarray:
    """Acoustic features of one video frame's audio.

    window: float32 (samples,) at 16 kHz, full scale +-1, covering
    ``[frame_start - lookbehind_samples, frame_end + lookahead_samples)``, zero-padded
    at utterance edges. The features use the audio from 35 ms before the frame's
    start to 5 ms after its end (the level kernel; the spectrum: -19..+29 ms), so
    the layout only says where the frame lies in the window.
    Returns float32 (N_FEATURES,) = (8,), see ``FEATURE_NAMES``:

    - level_dbfs: RMS level in dB re full scale 1.0 (a full-scale sine is -3 dBFS),
      weighted 1 within LEVEL_CORE_MS / 2 (20 ms) of the point LEVEL_CENTRE_MS (5 ms)
      after the frame start and CONTEXT_WEIGHT for LEVEL_CONTEXT_MS (20 ms) beyond;
      SILENCE_DBFS (-100) for an all-zero window.
    - frac_*: fractions of the spectral energy in the ``BAND_EDGES_HZ`` bands (sum 1),
      from a 48 ms Hann window centred on the same point.
    - centroid_khz: spectral centroid (kHz); f1_khz, f2_khz: the formant proxies
      (``F1_BAND_HZ``, ``F2_BAND_HZ``). Spectral features are 0 for silence.
    """
    x = np.asarray(window, dtype=np.float32)
    n = x.shape[0]
    weights = _level_weights(n, lookbehind_samples, LEVEL_CENTRE_MS, LEVEL_CORE_MS, LEVEL_CONTEXT_MS, CONTEXT_WEIGHT)
    power = float(np.dot(x * x, weights))
    out = np.zeros(N_FEATURES, np.float32)
    out[0] = 10.0 * np.log10(power + 1e-10)

    hann, band, khz, f1, f2, f2_weight = _spectral_tables()
    a = lookbehind_samples + int(round(LEVEL_CENTRE_MS * SAMPLE_RATE / 1000.0)) - SPEC_SAMPLES // 2
    seg = np.zeros(SPEC_SAMPLES)
    lo, hi = max(a, 0), min(a + SPEC_SAMPLES, n)
    if hi > lo:
        seg[lo - a:hi - a] = x[lo:hi]
    spec = np.fft.rfft(seg * hann, N_FFT)
    p = spec.real * spec.real + spec.imag * spec.imag
    total = p.sum()
    if total > 1e-20:
        out[1:5] = np.bincount(band, weights=p, minlength=4)[:4] / total
        out[5] = _centroid(p, khz)
        out[6] = _centroid(p[f1], khz[f1])
        out[7] = _centroid(p[f2] * f2_weight, khz[f2])
    return out


# ---------------------------------------------------------------------------
# Features -> mouth shape (openness, width), and its smoothing

# Openness from level. Speech recorded near full scale (peaks -1..-5 dBFS) has a
# 40 ms RMS of about -23/-20 dBFS median and -15 dBFS on loud vowels (the demo
# media yongen.wav / sun.wav: median -23 / -20, 90th percentile -16 / -13 dBFS);
# a quiet room / TTS noise floor is below -50 dBFS.
FLOOR_DBFS = -50.0  # at or below: mouth closed (openness exactly 0)
FULL_DBFS = -15.0  # at or above: openness 1
OPEN_GAMMA = 2.5  # openness = x ** OPEN_GAMMA, x = (level - floor) / (full - floor): zero
#                   slope at the floor (noise just above it barely moves the mouth), and
#                   most of the range spent on the top 15 dB, where speech lives
# Frication (centroid far above every vowel's F2, e.g. /s/ /f/) is made with the jaw
# nearly closed: openness is reduced by up to FRICATIVE_CLOSE as the centroid rises
# over FRICATIVE_KHZ. Voiced frames of the demo speech have centroids of 0.1-0.6 kHz,
# fricative frames 4-6 kHz.
FRICATIVE_KHZ = (2.0, 4.5)
FRICATIVE_CLOSE = 0.5
# Width. Lip spreading goes with front vowels (high F2), rounding with back vowels
# (low F2) that are also close (low F1: /u/ /o/, not /a/). Spread = tanh(SPREAD_SLOPE
# * log2(F2 / NEUTRAL_F2_KHZ)); NEUTRAL_F2_KHZ lies between the F2 of a uniform vocal
# tract (schwa, 3c / 4L) of a man (L 17.5 cm: 1.5 kHz) and of a woman (14.5 cm:
# 1.8 kHz); the F2 proxy of voiced frames of the demo speech has medians 1.8 / 1.6
# kHz (width quartiles -0.35..+0.36 / -0.62..+0.14). On vowels synthesised with
# Peterson & Barney's formants (men / women): /i/ +0.6 / +0.9, /e/ -0.1 / +0.3,
# /a/ -0.1 / 0, /o/ -0.5 / -0.5, /u/ -0.95 / -0.95. Negative values
# (rounding) are scaled by 1 - smoothstep((F1 - ROUND_F1_KHZ[0]) / span): full for
# /u/ (F1 300 Hz), about half for /o/ (570), none for /a/ (730).
NEUTRAL_F2_KHZ = 1.6
SPREAD_SLOPE = 2.0
ROUND_F1_KHZ = (0.45, 0.75)
# The formant proxies only mean something for voiced sounds, whose energy lies mostly
# below 1 kHz: width is scaled by smoothstep((frac below 1 kHz - VOICED_FRAC[0]) / span),
# and by min(1, openness / WIDTH_FULL_OPENNESS) (quiet frames are unreliable and
# silence has width 0).
VOICED_FRAC = (0.3, 0.7)
WIDTH_FULL_OPENNESS = 0.3


# Automatic level adaptation (per session, ``LevelReference``). The fixed curve above
# assumes one recording level; speech recorded near full scale sits mostly in its top
# 15 dB and keeps the mouth wide open (median openness ~0.8 on the demo media), so
# syllables barely contrast. With a reference level ``ref_dbfs`` (a running estimate
# of the loud parts of the current speech) the level is mapped relative to it instead:
# openness = x ** REL_GAMMA, x = (level - lo) / (ref - lo), lo = max(ref - REL_RANGE_DB,
# FLOOR_DBFS). A syllable's peak (at the reference) opens 1, a frame 1.5 / 3 / 6 / 10 dB
# below it 0.81 / 0.64 / 0.36 / 0.11, and the absolute floor still closes the mouth
# (exactly 0 at or below FLOOR_DBFS, whatever the reference). The demo media are
# strongly compressed (half the voiced 40 ms frames within 3 dB of the running peak),
# hence the short range and the steep top.
REL_RANGE_DB = 15.0  # dB below the reference where openness reaches 0: a syllable's
#                      nucleus vs its consonants / offglides spans ~10-20 dB
REL_GAMMA = 2.0  # > 1: steep near the reference (contrast among the loud frames), zero
#                  slope at the bottom (quiet consonants barely move the jaw)
# The reference: a peak follower in dB, stepped once per 40 ms frame. Attack is
# instant (a louder frame raises it at once, so the loudest frame of a syllable opens
# the mouth fully); release is a one-pole decay toward the frame's level with a
# REF_DECAY_MS time constant, long against a syllable (~200-300 ms) so a syllable's
# quiet part is measured against its own nucleus, short enough to follow a speaker or
# a recording level change within a sentence or two.
REF_INIT_DBFS = -20.0  # start of a session / after reset(): the 40 ms RMS of normally
#                        recorded speech's loud vowels (the demo media: -16 / -13 dBFS at
#                        the 90th percentile), so the first syllable already looks right
REF_DECAY_MS = 1500.0
# Only frames that look like voiced speech move the reference: level above REF_GATE_DB
# below the reference (and above the floor), and at least REF_VOICED_FRAC of the
# spectral energy below 1 kHz (fricatives / breath noise don't pull it down or up).
REF_GATE_DB = 24.0
REF_VOICED_FRAC = 0.5
# Range of the reference: below REF_MIN_DBFS (a very quiet talker / recording) the
# mapping keeps at least a 15 dB span above the floor, so background noise a little
# above -50 dBFS never opens the mouth wide; above REF_MAX_DBFS nothing is speech.
REF_MIN_DBFS = FLOOR_DBFS + 15.0
REF_MAX_DBFS = -3.0


class LevelReference:
    """Per-session running reference level (dBFS) of the loud parts of the speech.

    ``update(features)`` steps it once per video frame with that frame's
    ``audio_features`` and returns the new reference, to pass to ``mouth_shape``.
    Instant attack, REF_DECAY_MS release toward the frame level, voiced frames only.
    """

    def __init__(self, init_dbfs: float = REF_INIT_DBFS, decay_ms: float = REF_DECAY_MS):
        self.init = float(np.clip(init_dbfs, REF_MIN_DBFS, REF_MAX_DBFS))
        self.decay = _alpha(decay_ms)
        self.ref_dbfs = self.init

    def reset(self) -> None:
        self.ref_dbfs = self.init

    def update(self, features: np.ndarray) -> float:
        """Step with one frame's features (8,); returns the reference level (dBFS)."""
        level = float(features[0])
        if (level > FLOOR_DBFS and level > self.ref_dbfs - REF_GATE_DB
                and float(features[1]) + float(features[2]) >= REF_VOICED_FRAC):
            ref = level if level > self.ref_dbfs else self.ref_dbfs + self.decay * (level - self.ref_dbfs)
            self.ref_dbfs = min(max(ref, REF_MIN_DBFS), REF_MAX_DBFS)
        return self.ref_dbfs


def _smoothstep(x):
    """Hermite 0..1 ramp 3x^2 - 2x^3 of x clipped to [0, 1] (float or ndarray)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ramp(x: float, lo_hi: tuple[float, float]) -> float:
    return float(_smoothstep((x - lo_hi[0]) / (lo_hi[1] - lo_hi[0])))


def mouth_shape(features: np.ndarray, ref_dbfs: float | None = None) -> tuple[float, float]:
    """Target (openness, width) of one frame from its ``audio_features`` (8,) vector.

    openness: [0, 1], 0 = lips closed (exactly 0 at or below FLOOR_DBFS), 1 = jaw
    fully dropped. width: [-1, 1], + = spread lips (front vowels /i/ /e/: high F2),
    - = rounded (/u/ /o/: F1 and F2 both low, energy concentrated below 1 kHz),
    scaled down when openness is small. ref_dbfs: the session's reference level
    (``LevelReference``); openness then follows the level relative to it (REL_RANGE_DB,
    REL_GAMMA), still exactly 0 at or below FLOOR_DBFS. None: the fixed absolute curve
    (FLOOR_DBFS .. FULL_DBFS, OPEN_GAMMA). Stateless; see ``MouthSmoother``.
    """
    level, low, mid = float(features[0]), float(features[1]), float(features[2])
    centroid, f1, f2 = float(features[5]), float(features[6]), float(features[7])
    if ref_dbfs is None:
        lo, hi, gamma = FLOOR_DBFS, FULL_DBFS, OPEN_GAMMA
    else:
        hi = max(float(ref_dbfs), REF_MIN_DBFS)
        lo, gamma = max(hi - REL_RANGE_DB, FLOOR_DBFS), REL_GAMMA
    x = (level - lo) / (hi - lo)
    if x <= 0.0 or level <= FLOOR_DBFS:
        return 0.0, 0.0
    openness = min(x, 1.0) ** gamma * (1.0 - FRICATIVE_CLOSE * _ramp(centroid, FRICATIVE_KHZ))
    width = float(np.tanh(SPREAD_SLOPE * np.log2(f2 / NEUTRAL_F2_KHZ))) if f2 > 0.0 else 0.0
    if width < 0:
        width *= 1.0 - _ramp(f1, ROUND_F1_KHZ)
    width *= _ramp(low + mid, VOICED_FRAC) * min(1.0, openness / WIDTH_FULL_OPENNESS)
    return openness, width


# Smoothing: one-pole filters stepped once per 40 ms frame, alpha = 1 - exp(-40 / tau).
# The jaw opens fast and closes slowly: attack ~20 ms (a syllable onset reaches 90 %
# within 2 frames), release ~75 ms (closing over ~4 frames, no flicker between
# syllables). Width (lip spread/rounding) uses one symmetric time constant.
ATTACK_MS = 20.0
RELEASE_MS = 75.0
WIDTH_MS = 60.0
SNAP = 0.02  # below this (target 0), a smoothed value snaps to exactly 0 (idle frame)


def _alpha(tau_ms: float) -> float:
    return 1.0 - float(np.exp(-FRAME_MS / tau_ms)) if tau_ms > 0 else 1.0


class MouthSmoother:
    """Attack/release smoothing of (openness, width), one step per video frame.

    attack_ms / release_ms: time constants (ms) of the openness filter when the
    target is above / below the current value; width_ms: width's time constant.
    """

    def __init__(self, attack_ms: float = ATTACK_MS, release_ms: float = RELEASE_MS, width_ms: float = WIDTH_MS):
        self.attack, self.release, self.width_alpha = _alpha(attack_ms), _alpha(release_ms), _alpha(width_ms)
        self.state = (0.0, 0.0)

    def reset(self) -> None:
        self.state = (0.0, 0.0)

    def step(self, openness: float, width: float) -> tuple[float, float]:
        """Advance one frame toward the target; returns the smoothed (openness, width)."""
        o, w = self.state
        o += (self.attack if openness > o else self.release) * (openness - o)
        w += self.width_alpha * (width - w)
        if openness == 0.0 and o < SNAP:
            o = 0.0
        if width == 0.0 and abs(w) < SNAP:
            w = 0.0
        self.state = (o, w)
        return self.state


# ---------------------------------------------------------------------------
# Renderer: lip/jaw warp driven by the iBUG-68 landmarks
#
# Geometry is expressed in the *mouth frame*: origin midway between the outer lip
# corners (48, 54), x along the corners (u), y perpendicular, downward (v), unit
# length W = corner distance (the mouth width). The *mouth line* runs 48 -> 60 ->
# points between the inner-lip pairs (61,67) (62,66) (63,65) -> 64 -> 54: where the
# lips part (see SPLIT_AT). Amplitudes are fractions of W, rough adult proportions:
# in open vowels the lips part by up to ~1.5-2 cm against a ~5 cm mouth width, and
# spreading / rounding changes the mouth width by roughly +-25 %.
JAW_DROP = 0.35  # lower lip / chin displacement at openness 1 (x W)
LIP_LIFT = 0.06  # upper lip lift at openness 1 (x W), fading toward the nose
LIP_SPAN = 0.85  # the lips part over this central fraction of the mouth width (corners stay shut)
LIP_PROFILE = 0.75  # opening across it: (1 - (x / half span)^2) ** this (rounder than a parabola)
CORNER_SHIFT = 0.12  # outward (width +1) / inward (width -1) corner motion (x W)
CHIN_FALLOFF = 0.7  # jaw motion fades to 0 this far (x W) outside the jaw contour 2..14
CHIN_CORE = 0.45  # jaw moves fully for |x| < this (x W), fading to 0 at the jaw line (4 / 12)
CORNER_FALLOFF = 0.6  # corner motion fades to 0 this far (x W) beyond the corners
SPREAD_BAND = (0.2, 0.45, 0.4)  # corner motion: full from 0.2 W above to 0.45 W below the
#                                 mouth line (the lower lip moves down), fading over 0.4 W
SPLIT_AT = 0.7  # where between the upper (0) and lower (1) inner lip the mouth parts: visible
#                 teeth of an open-mouthed avatar are mostly upper teeth, which stay up
SPLIT_PX = 1.5  # the lips part over a band this wide (px, at least 0.04 W) at the mouth line
FEATHER = 0.08  # patch mask fades to 0 over this fraction of the ROI size at its border (>= 3 px)
N_CONTOUR = 33  # points per mouth-line contour (inner mouth polygon)
# Inner mouth (BGR): near-black cavity, dark red toward the tongue (lower lip), and
# for a closed-mouthed avatar a hint of upper teeth under the upper lip.
CAVITY_BGR = np.array([14, 9, 20], np.float32)
TONGUE_BGR = np.array([38, 34, 105], np.float32)
TEETH_BGR = np.array([176, 184, 196], np.float32)
TEETH_HEIGHT = 0.09  # teeth band height (x W, at most 0.4 x the local gap)
TEETH_OPENNESS = (0.25, 0.75)  # teeth fade in over this openness range
CACHE_BYTES = 256 << 20  # bound of the per-source-frame rig cache (all avatars)


@dataclass
class _Rig:
    """Precomputed warp geometry of one avatar source frame (ROI pixel coordinates).

    box: ROI (x1, y1, x2, y2) in frame pixels. open_a: float32 (h, w) displacement
    along v per unit openness; width_b: float32 (h, w) along u per unit width (px;
    output pixel p samples the source at p - displacement). u, v: the mouth axes
    (frame pixels). line: float32 (N_CONTOUR, 2) mouth line; line_up / line_lo: its
    displacement per unit openness on the upper / lower lip; line_w: per unit width.
    teeth: strength of the painted teeth hint (1 for a closed mouth, 0 when the
    avatar already shows teeth). w_px: the mouth width W.
    """

    box: tuple[int, int, int, int]
    open_a: np.ndarray
    width_b: np.ndarray
    u: tuple[float, float]
    v: tuple[float, float]
    line: np.ndarray
    line_up: np.ndarray
    line_lo: np.ndarray
    line_w: np.ndarray
    teeth: float
    w_px: float


class _MouthFrame:
    """Landmark geometry of one face in the mouth frame, and the analytic fields."""

    def __init__(self, lm: np.ndarray):
        lm = lm.astype(np.float64)
        self.c = (lm[48] + lm[54]) / 2
        d = lm[54] - lm[48]
        self.W = float(np.hypot(*d))
        self.u = d / self.W
        self.v = np.array([-self.u[1], self.u[0]])
        m = self.to_mouth(lm)
        upper, lower = m[[61, 62, 63]], m[[67, 66, 65]]
        line = np.concatenate([m[[48, 60]], upper + SPLIT_AT * (lower - upper), m[[64, 54]]])
        line = line[np.argsort(line[:, 0])]
        keep = np.concatenate([[True], np.diff(line[:, 0]) > 1e-3])
        self.line_x0, self.line_x1 = line[0, 0], line[-1, 0]
        self.line_fn = PchipInterpolator(line[keep, 0], line[keep, 1])
        W = self.W
        self.chin_h = max(m[8, 1] - self.y0(m[8, 0]), 0.5 * W)  # mouth line to chin
        self.nose_h = max(self.y0(m[33, 0]) - m[33, 1], 0.2 * W)  # nose tip to mouth line
        self.jaw_l, self.jaw_r = min(m[4, 0], -0.7 * W), max(m[12, 0], 0.7 * W)
        self.gap = float(np.mean(m[[65, 66, 67], 1] - m[[63, 62, 61], 1]))  # inner lip gap now

    def to_mouth(self, p: np.ndarray) -> np.ndarray:
        q = p - self.c
        return np.stack([q @ self.u, q @ self.v], axis=-1)

    def y0(self, x):
        """Mouth line height at mouth-frame x (constant beyond the corners)."""
        return self.line_fn(np.clip(x, self.line_x0, self.line_x1))

    def fields(self, x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Displacement magnitudes at mouth-frame x and height s above/below the mouth line.

        Returns (lower, upper, width): per unit openness, the jaw/lower-lip motion
        along +v (before the jaw-contour falloff) and the upper-lip motion along +v
        (negative: up); per unit width, the motion along +u. All in pixels.
        """
        W = self.W
        ax = np.abs(x)
        lip = np.clip(1.0 - (x / (LIP_SPAN * W / 2)) ** 2, 0.0, None) ** LIP_PROFILE  # 1 at the centre
        side = np.where(x < 0, -self.jaw_l, self.jaw_r)
        jaw = 1.0 - _smoothstep((ax - CHIN_CORE * W) / (side - CHIN_CORE * W))
        b = _smoothstep(s / self.chin_h)  # lip profile at the mouth line -> jaw profile at the chin
        lower = JAW_DROP * W * ((1.0 - b) * lip + b * jaw)
        upper = -LIP_LIFT * W * lip * (1.0 - _smoothstep(-s / self.nose_h))
        half = W / 2
        f = np.where(ax <= half, x / half, np.sign(x) * (1.0 - _smoothstep((ax - half) / (CORNER_FALLOFF * W))))
        above, below, fade = SPREAD_BAND
        e = (1.0 - _smoothstep((-s - above * W) / (fade * W))) * (1.0 - _smoothstep((s - below * W) / (fade * W)))
        return lower, upper, CORNER_SHIFT * W * f * e


def _open_sides(box: tuple[int, int, int, int], frame_size: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
    """Which ROI sides (left, top, right, bottom) lie inside the frame (not on its border)."""
    x1, y1, x2, y2 = box
    return x1 > 0, y1 > 0, x2 < frame_size[0], y2 < frame_size[1]


@lru_cache(maxsize=64)
def _feather_mask(h: int, w: int, open_sides: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """float32 (h, w) patch mask: 1 inside, smoothly 0 at the ROI sides (left, top,
    right, bottom) flagged in ``open_sides``; sides on the frame border stay 1."""
    n = max(3.0, FEATHER * min(h, w))

    def ramp(k: int, first: bool, last: bool) -> np.ndarray:
        i, r = np.arange(k) + 0.5, np.full(k, np.inf)
        if first:
            r = np.minimum(r, i)
        if last:
            r = np.minimum(r, k - i)
        return _smoothstep(r / n)

    mask = (ramp(h, open_sides[1], open_sides[3])[:, None] * ramp(w, open_sides[0], open_sides[2])[None, :])
    mask = mask.astype(np.float32)
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=64)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (h, w) x and y pixel coordinates of an h x w ROI (the identity map)."""
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def _roi(g: _MouthFrame, lm: np.ndarray, frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """ROI (x1, y1, x2, y2) covering everything the fields move, clipped to the frame."""
    W, c, u, v = g.W, g.c, g.u, g.v
    side = (0.5 + CORNER_FALLOFF + 0.1) * W * u
    pts = np.concatenate([lm[2:15], lm[33:34] - 0.15 * W * v,
                          lm[8:9] + (CHIN_FALLOFF + JAW_DROP + 0.1) * W * v, (c + side)[None], (c - side)[None]])
    lo, hi = pts.min(axis=0) - (0.05 * W + 2), pts.max(axis=0) + (0.05 * W + 2)
    fw, fh = frame_size
    return max(int(lo[0]), 0), max(int(lo[1]), 0), min(int(np.ceil(hi[0])), fw), min(int(np.ceil(hi[1])), fh)


def _build_rig(lm: np.ndarray, frame_size: tuple[int, int]) -> _Rig | None:
    """The warp geometry of a face with landmarks ``lm`` (68, 2) in a (width, height)
    frame; None when there is no usable face (NaN landmarks, a mouth under 4 px wide,
    or a mouth region outside the frame)."""
    if not np.isfinite(lm).all() or np.hypot(*(lm[54] - lm[48])) < 4:
        return None
    g = _MouthFrame(lm)
    W, c, u, v = g.W, g.c, g.u, g.v
    x1, y1, x2, y2 = box = _roi(g, lm, frame_size)
    h, w = y2 - y1, x2 - x1
    if h < 8 or w < 8:
        return None
    gx, gy = _grid(h, w)
    m = g.to_mouth(np.stack([gx + x1, gy + y1], axis=-1).astype(np.float64))
    mx, my = m[..., 0], m[..., 1]
    s = my - g.y0(mx)
    lower, upper, width = g.fields(mx, s)
    # Jaw motion fades with the distance outside the jaw contour (chin -> neck, jaw -> background).
    outside = np.full((h, w), 255, np.uint8)
    cv2.fillPoly(outside, [np.round(lm[2:15] - (x1, y1)).astype(np.int32)], 0)
    lower *= 1.0 - _smoothstep(cv2.distanceTransform(outside, cv2.DIST_L2, 5) / (CHIN_FALLOFF * W))
    split = max(SPLIT_PX, 0.04 * W)
    below = _smoothstep((s + split / 2) / split)  # 0 above the mouth line, 1 below
    mask = _feather_mask(h, w, _open_sides(box, frame_size))
    # Mouth line contour and its motion on the upper / lower lip side.
    lx = np.linspace(g.line_x0, g.line_x1, N_CONTOUR)
    lower_l, upper_l, width_l = g.fields(lx, np.zeros_like(lx))
    line = c + lx[:, None] * u + g.y0(lx)[:, None] * v - (x1, y1)
    f32 = np.float32
    return _Rig(
        box=box, open_a=((below * lower + (1.0 - below) * upper) * mask).astype(f32),
        width_b=(width * mask).astype(f32), u=(float(u[0]), float(u[1])), v=(float(v[0]), float(v[1])),
        line=line.astype(f32), line_up=(upper_l[:, None] * v).astype(f32),
        line_lo=(lower_l[:, None] * v).astype(f32), line_w=(width_l[:, None] * u).astype(f32),
        teeth=float(np.clip(1.0 - g.gap / (0.05 * W), 0.0, 1.0)), w_px=W,
    )


_cache: OrderedDict[tuple[int, int], _Rig | None] = OrderedDict()
_cache_bytes = 0
_cache_avatars: set[int] = set()  # ids of the avatars with a finalizer that empties their entries
_cache_lock = threading.Lock()


def _rig_bytes(rig: _Rig | None) -> int:
    return 0 if rig is None else rig.open_a.nbytes + rig.width_b.nbytes


def _forget(avatar_key: int) -> None:
    global _cache_bytes
    with _cache_lock:
        _cache_avatars.discard(avatar_key)
        for k in [k for k in _cache if k[0] == avatar_key]:
            _cache_bytes -= _rig_bytes(_cache.pop(k))


def _rig(avatar: Avatar, loop_index: int) -> _Rig | None:
    """The rig of loop frame ``loop_index`` (None: no face), built on first use.

    Shared by all sessions: a module-level LRU cache keyed by (avatar object, source
    frame), at most CACHE_BYTES; an avatar's entries go when the avatar is freed.
    """
    global _cache_bytes
    key = (id(avatar), avatar.source_index(loop_index))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    rig = _build_rig(avatar.landmarks[loop_index % len(avatar)], avatar.size)
    with _cache_lock:
        if key[0] not in _cache_avatars:
            _cache_avatars.add(key[0])
            weakref.finalize(avatar, _forget, key[0])
        if key not in _cache:
            _cache[key] = rig
            _cache_bytes += _rig_bytes(rig)
        while _cache_bytes > CACHE_BYTES and len(_cache) > 1:
            _cache_bytes -= _rig_bytes(_cache.popitem(last=False)[1])
    return rig


def _paint_mouth(out: np.ndarray, rig: _Rig, openness: float, width: float) -> None:
    """Paint the inner mouth into the warped ROI ``out`` (uint8 (h, w, 3), in place).

    The polygon between the mouth line moved with the upper lip and with the lower
    lip (the same displacement as the warp), grown by up to 0.6 px to overlap the lip
    edges, antialiased and feathered by ~1 px; filled with a vertical cavity-to-tongue
    gradient, the teeth hint, and darker toward the corners."""
    v = np.asarray(rig.v, np.float32)
    gap = openness * (rig.line_lo - rig.line_up) @ v  # (N_CONTOUR,) px
    if gap.max() < 0.3:
        return
    parted = np.flatnonzero(gap > 0.05)
    k = slice(max(parted[0] - 1, 0), parted[-1] + 2)  # where the lips part, plus the closing points
    gap, base = gap[k], rig.line[k] + width * rig.line_w[k]
    grow = (0.6 * np.clip(gap / 2, 0, 1))[:, None] * v  # overlap the lips by up to 0.6 px
    up = base + openness * rig.line_up[k] - grow
    lo = base + openness * rig.line_lo[k] + grow
    poly = np.concatenate([up, lo[::-1]])
    h, w = out.shape[:2]
    bx1, by1 = np.maximum(np.floor(poly.min(axis=0)).astype(int) - 2, 0)
    bx2, by2 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 3, (w, h))
    if bx2 <= bx1 or by2 <= by1:
        return
    cover = np.zeros((by2 - by1, bx2 - bx1), np.uint8)
    cv2.fillPoly(cover, [np.round((poly - (bx1, by1)) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(cover, (3, 3), 0.6).astype(np.float32) * (1 / 255)

    xs = np.arange(bx1, bx2, dtype=np.float32)
    y_up = np.interp(xs, up[:, 0], up[:, 1])
    y_lo = np.interp(xs, lo[:, 0], lo[:, 1])
    depth = np.arange(by1, by2, dtype=np.float32)[:, None] - y_up  # px below the upper lip
    t = np.clip(depth / np.maximum(y_lo - y_up, 1.0), 0.0, 1.0)
    tongue = (0.85 * _smoothstep((t - 0.45) / 0.55))[..., None]
    color = CAVITY_BGR + (TONGUE_BGR - CAVITY_BGR) * tongue
    teeth = rig.teeth * float(_smoothstep((openness - TEETH_OPENNESS[0]) / (TEETH_OPENNESS[1] - TEETH_OPENNESS[0])))
    if teeth > 0:
        band = np.minimum(TEETH_HEIGHT * rig.w_px, 0.4 * (y_lo - y_up))
        tw = (teeth * (1.0 - _smoothstep(depth - band + 0.5)))[..., None]
        color += (TEETH_BGR - color) * tw
    span = max(float(up[-1, 0] - up[0, 0]) / 2, 1.0)
    rx = (xs - float(up[0, 0] + up[-1, 0]) / 2) / span
    color *= (0.5 + 0.5 * np.clip(1.0 - rx * rx, 0.0, 1.0))[None, :, None]  # darker toward the corners
    region = out[by1:by2, bx1:bx2]
    a = alpha[..., None]
    region[:] = (region * (1.0 - a) + color * a + 0.5).astype(np.uint8)


def render_mouth(avatar: Avatar, loop_index: int, openness: float, width: float) -> FacePatch | None:
    """The mouth of loop frame ``loop_index`` at (openness [0, 1], width [-1, 1]).

    Returns a FacePatch over the mouth/jaw ROI (uint8 BGR image, feathered float32
    mask), or None for the idle frame (openness 0 and width 0) and for frames with
    no face. Thread-safe; never writes into the avatar's frames.
    """
    if openness <= 0.0 and width == 0.0:
        return None
    rig = _rig(avatar, loop_index)
    if rig is None:
        return None
    x1, y1, x2, y2 = rig.box
    gx, gy = _grid(y2 - y1, x2 - x1)
    (ux, uy), (vx, vy) = rig.u, rig.v
    map_x = cv2.scaleAdd(rig.width_b, -width * ux, cv2.scaleAdd(rig.open_a, -openness * vx, gx))
    map_y = cv2.scaleAdd(rig.width_b, -width * uy, cv2.scaleAdd(rig.open_a, -openness * vy, gy))
    src = avatar.frame(loop_index)[y1:y2, x1:x2]
    out = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    _paint_mouth(out, rig, openness, width)
    return FacePatch(out, rig.box, _feather_mask(y2 - y1, x2 - x1, _open_sides(rig.box, avatar.size)))


class VisemeWarpModel(LipSyncModel):
    """The embedded default lip-sync model (``basereal.LipSyncModel``, docs/contracts.md).

    One instance per session; the warp geometry is shared between sessions of the
    same avatar. avatar: ``avatar.Avatar``. lookahead_ms / lookbehind_ms: audio
    context after / before the frame (rounded down to 20 ms chunks); the lookahead
    is the model's algorithmic latency. The level kernel needs 35 ms before and 5 ms
    after the frame (``LEVEL_CENTRE_MS``); with less context it is cut short.
    attack_ms / release_ms / width_ms: smoothing (``MouthSmoother``).
    adapt_level: map the level relative to a running per-session reference
    (``LevelReference``, kept across ``reset()``) instead of the fixed absolute curve.
    ``mouth_state``: the last smoothed (openness, width).
    """

    name = "viseme"

    def __init__(self, avatar: Avatar, lookahead_ms: int = 20, lookbehind_ms: int = 40,
                 attack_ms: float = ATTACK_MS, release_ms: float = RELEASE_MS, width_ms: float = WIDTH_MS,
                 adapt_level: bool = True):
        self.avatar = avatar
        self.lookahead_chunks = max(0, lookahead_ms // CHUNK_MS)
        self.lookbehind_chunks = max(0, lookbehind_ms // CHUNK_MS)
        self.smoother = MouthSmoother(attack_ms, release_ms, width_ms)
        self.level_ref = LevelReference() if adapt_level else None

    @property
    def mouth_state(self) -> tuple[float, float]:
        return self.smoother.state

    def features(self, window: np.ndarray) -> np.ndarray:
        """float32 (N_FEATURES,) ``audio_features`` of one frame's context window: float32
        (samples,) at 16 kHz, lookbehind + 640 + lookahead samples."""
        return audio_features(window, self.lookbehind_chunks * CHUNK_SAMPLES, self.lookahead_chunks * CHUNK_SAMPLES)

    def infer(self, features: np.ndarray, loop_indices: Sequence[int]) -> list[FacePatch | None]:
        """features: float32 (B, N_FEATURES), consecutive frames in order; loop_indices:
        B avatar loop indices. Steps the smoothing once per frame and returns B patches
        (None: idle mouth, or no face in that avatar frame)."""
        out = []
        for f, i in zip(np.asarray(features, np.float32).reshape(len(loop_indices), -1), loop_indices):
            openness, width = self.step(f)
            out.append(render_mouth(self.avatar, i, openness, width))
        return out

    def step(self, features: np.ndarray) -> tuple[float, float]:
        """Advance the level reference and the smoothing by one frame (features (8,));
        returns the smoothed (openness, width). No rendering."""
        ref = None if self.level_ref is None else self.level_ref.update(features)
        return self.smoother.step(*mouth_shape(features, ref))

    def reset(self) -> None:
        """Close the mouth (smoothing state). The level reference is the speaker's and
        persists across the session's pauses and interrupts (the worker resets after
        every silence)."""
        self.smoother.reset()
