"""MuseTalk audio features: Whisper-tiny layer stacks and per-video-frame windows.

MuseTalk conditions its UNet on a window of Whisper-tiny encoder activations
(see ``docs/musetalk-facts.md``, "Audio features"):

- 16 kHz mono -> Whisper log-mel (80 bins, 10 ms hop) -> encoder (two convolutions,
  the second with stride 2, so one *feature frame* per 20 ms = 320 samples, plus the
  sinusoidal positional embedding, 4 residual blocks).
- Per feature frame, 5 stacked tensors: the embedded input and the output of each
  block -> (T50, 5, d), d = 384 for Whisper-tiny. v1.5 applies ``ln_post`` to the
  4th block's output; v1.0 does not.
- Video frame ``f`` (25 fps) uses feature frames ``2f-4 .. 2f+5``, i.e. audio
  ``[f/25 - 80 ms, f/25 + 120 ms)``, flattened time-major to (50, d)
  (token ``t*5 + layer``). Out of range: v1.0 repeats the edge frame, v1.5 uses zeros.

:func:`reference_features` is the offline reference (every 30 s segment padded to
30 s, as Whisper's stock encoder demands). :class:`StreamingFeatureExtractor` runs the
encoder on a short span around the frames instead (their own 200 ms plus left/right
context); ``bench/musetalk_feature_drift.py`` measures how far it drifts from the
reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from whisper.audio import (
    HOP_LENGTH,
    N_FFT,
    N_SAMPLES,
    N_SAMPLES_PER_TOKEN,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)
from whisper.model import AudioEncoder, ResidualAttentionBlock

from clock import FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "FEATURE_SAMPLES",
    "WINDOW_TOKENS",
    "N_STACKED",
    "normalize_version",
    "encoder_layer_stack",
    "reference_features",
    "frame_window",
    "frame_windows",
    "StreamState",
    "StreamingFeatureExtractor",
]

# One encoder output frame covers 2 mel hops: 320 samples = 20 ms (whisper.audio).
FEATURE_SAMPLES = N_SAMPLES_PER_TOKEN
FEATURES_PER_VIDEO_FRAME = FRAME_SAMPLES // FEATURE_SAMPLES  # 2 (40 ms / 20 ms)
# Whisper's fixed 30 s input: 480000 samples -> 1500 feature frames (positional table size).
SEGMENT_SAMPLES = N_SAMPLES
SEGMENT_FEATURES = SEGMENT_SAMPLES // FEATURE_SAMPLES  # 1500
# The stacked layers: embedded input + the 4 blocks of Whisper-tiny (facts doc).
N_BLOCKS = 4
N_STACKED = N_BLOCKS + 1  # 5
# Window of video frame f: feature frames 2f-4 .. 2f+5 (facts doc).
WINDOW_BEFORE = 4  # feature frames before 2f (80 ms)
WINDOW_FEATURES = 10  # 200 ms
WINDOW_AFTER = WINDOW_FEATURES - WINDOW_BEFORE  # feature frames from 2f on (120 ms)
WINDOW_TOKENS = WINDOW_FEATURES * N_STACKED  # 50
# Audio a frame's window needs around the frame's own 40 ms, in samples.
WINDOW_LOOKBEHIND_SAMPLES = WINDOW_BEFORE * FEATURE_SAMPLES  # 1280 (80 ms before its start)
WINDOW_LOOKAHEAD_SAMPLES = WINDOW_AFTER * FEATURE_SAMPLES - FRAME_SAMPLES  # 1280 (80 ms after its end)
# Whisper's log-mel (whisper/audio.py): log10 power, floored 8 decades below the
# peak, then mapped with (x + 4) / 4.
LOG_MEL_DYNAMIC_RANGE = 8.0
FEATURE_MS = 1000 * FEATURE_SAMPLES / SAMPLE_RATE  # 20.0
# Streaming defaults, from bench/musetalk_feature_drift.py on yongen.wav + sun.wav with a
# Whisper-tiny-sized encoder of random weights (re-run it with the real tiny.pt):
# - 80 ms left / 40 ms right context: the least with which the window's first and last
#   20 ms are as accurate as its middle (with none: +29 % / +9 % error there); more
#   context lowers the p95 drift by < 0.4 points.
# - 256 silence tokens: p95 drift within 0.1 point of one token per silent position
#   (exact), at 1/8 of the multiply-accumulates of a 30 s reference pass; 0 tokens
#   (attention within the span only) drifts by ~50 %.
DEFAULT_LEFT_CONTEXT_MS = 80
DEFAULT_RIGHT_CONTEXT_MS = 40
DEFAULT_SILENCE_TOKENS = 256

_VERSIONS = {"v15": "v15", "v1.5": "v15", "v1": "v1", "v10": "v1", "v1.0": "v1"}


def normalize_version(version: str) -> str:
    """MuseTalk version name -> ``"v15"`` or ``"v1"``.

    Accepts ``"v15"``/``"v1.5"`` and ``"v1"``/``"v10"``/``"v1.0"``.

    Raises:
        ValueError: any other name.
    """
    try:
        return _VERSIONS[version]
    except (KeyError, TypeError):
        raise ValueError(f"unknown MuseTalk version {version!r}; expected one of {sorted(_VERSIONS)}") from None


def _embed(encoder: AudioEncoder, mel: torch.Tensor, pos_offset: int) -> torch.Tensor:
    """(B, n_mels, N) log-mel -> (B, N / 2, d) block input: convolutions, GELUs and the
    positional rows ``(pos_offset + t) % n_ctx``."""
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    table = encoder.positional_embedding
    rows = (pos_offset + torch.arange(x.shape[1], device=table.device)) % table.shape[0]
    return (x + table[rows].to(x.device)).to(x.dtype)


def _check_encoder(encoder: AudioEncoder) -> None:
    """Raises ValueError unless ``encoder`` has Whisper-tiny's 4 blocks."""
    if len(encoder.blocks) != N_BLOCKS:
        raise ValueError(
            f"MuseTalk stacks Whisper-tiny's {N_BLOCKS} encoder blocks, this encoder has {len(encoder.blocks)}"
        )


def _stack(encoder: AudioEncoder, layers: list[torch.Tensor], version: str) -> torch.Tensor:
    """Stack the embedded input and the block outputs on dim 2 (``ln_post`` on the last for v1.5)."""
    if version == "v15":
        layers[-1] = encoder.ln_post(layers[-1])
    return torch.stack(layers, dim=2)


@torch.inference_mode()
def encoder_layer_stack(encoder: AudioEncoder, mel: torch.Tensor, version: str, pos_offset: int = 0) -> torch.Tensor:
    """Whisper encoder activations stacked per feature frame, for any even mel length.

    Runs the submodules of openai-whisper's ``AudioEncoder`` (conv1, GELU, conv2,
    GELU, + positional embedding, blocks, and ``ln_post`` on the last block's output
    for v1.5) instead of its ``forward``, which only accepts 3000 mel frames.

    Args:
        encoder: ``whisper.model.AudioEncoder`` with 4 blocks (Whisper-tiny layout).
        mel: (B, n_mels, N) log-mel frames (10 ms hop), N even and >= 2; its dtype and
            device are the compute dtype and device (whisper's layers cast weights).
        version: MuseTalk version (see :func:`normalize_version`).
        pos_offset: positional-embedding row of output frame 0. Output frame ``t``
            gets row ``(pos_offset + t) % n_ctx`` (n_ctx = 1500 for Whisper), i.e.
            its position within its 30 s Whisper segment.

    Returns:
        (B, N / 2, 5, d) tensor in ``mel``'s dtype: index 0 is the embedded input,
        1..4 the block outputs (index 4 after ``ln_post`` for v1.5).

    Raises:
        ValueError: N odd or 0, wrong number of mel bins, an encoder that does not
            have 4 blocks, or an unknown version.
    """
    version = normalize_version(version)
    _check_encoder(encoder)
    if mel.ndim != 3 or mel.shape[1] != encoder.conv1.in_channels or mel.shape[2] < 2 or mel.shape[2] % 2:
        raise ValueError(
            f"mel must be (B, {encoder.conv1.in_channels}, N) with N even and >= 2, got {tuple(mel.shape)}"
        )
    x = _embed(encoder, mel, pos_offset)
    layers = [x]
    for block in encoder.blocks:
        x = block(x)
        layers.append(x)
    return _stack(encoder, layers, version)


def _block_with_key_bias(block: ResidualAttentionBlock, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Whisper's ``ResidualAttentionBlock`` (self-attention only) with ``key_bias``
    (Tk,) added to every attention logit of key k: a key with bias ``log c`` weighs as
    ``c`` identical keys. Same scaling as whisper's ``qkv_attention`` (d_head^-0.5)."""
    attn = block.attn
    h = block.attn_ln(x)
    b, t, d = h.shape
    q, k, v = (
        m(h).view(b, t, attn.n_head, d // attn.n_head).transpose(1, 2) for m in (attn.query, attn.key, attn.value)
    )
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias.to(q.dtype)[None, None, None, :])
    x = x + attn.out(a.transpose(1, 2).reshape(b, t, d))
    return x + block.mlp(block.mlp_ln(x))


def _silence_groups(pos_offset: int, n_span: int, n_ctx: int, n_tokens: int) -> list[tuple[int, int]]:
    """Split the positions of an ``n_ctx`` segment that the span (rows
    ``(pos_offset + t) % n_ctx``, t < n_span) leaves free into about ``n_tokens``
    contiguous ranges ``[a, b)``, spread over the free runs in proportion to their
    length (at least one per run); [] when the span fills the segment."""
    if n_span >= n_ctx:
        return []
    a0 = pos_offset % n_ctx
    if a0 + n_span <= n_ctx:
        runs = [(0, a0), (a0 + n_span, n_ctx)]
    else:  # the span wraps past the segment end
        runs = [(a0 + n_span - n_ctx, a0)]
    free = n_ctx - n_span
    groups: list[tuple[int, int]] = []
    for a, b in runs:
        if b > a:
            m = min(b - a, max(1, round(n_tokens * (b - a) / free)))
            edges = np.linspace(a, b, m + 1).round().astype(int).tolist()
            groups += zip(edges[:-1], edges[1:])
    return groups


def _segment_layer_stack(
    encoder: AudioEncoder,
    mel: torch.Tensor,
    version: str,
    pos_offset: int,
    silence_value: float,
    groups: list[tuple[int, int]],
) -> torch.Tensor:
    """:func:`encoder_layer_stack` of a (1, n_mels, N) span as if it sat at its position
    in a 30 s segment whose other audio is silence (the reference's zero padding), the
    silent positions compressed to one token per range in ``groups``.

    A silent position's block input is the convolutions' response to a constant log-mel
    frame of ``silence_value`` (Whisper's floor) plus its positional row. A group's
    token takes the positional row of the group's middle position and weighs in
    attention as many keys as the group has positions. Returns (1, N / 2, 5, d): the
    span's frames only."""
    x = _embed(encoder, mel, pos_offset)
    n_span = x.shape[1]
    flat = torch.full((1, mel.shape[1], 6), silence_value, dtype=mel.dtype, device=mel.device)
    silent = F.gelu(encoder.conv2(F.gelu(encoder.conv1(flat))))[0, :, 1]  # an output clear of the zero padding
    a, b = torch.tensor(groups, device=x.device).T
    rows = encoder.positional_embedding[((a + b) // 2).to(encoder.positional_embedding.device)].to(x.device)
    tokens = (silent[None] + rows).to(x.dtype)
    key_bias = torch.cat([torch.zeros(n_span, device=x.device), torch.log((b - a).float())])
    h = torch.cat([x, tokens[None]], dim=1)
    layers = [x]
    for block in encoder.blocks:
        h = _block_with_key_bias(block, h, key_bias)
        layers.append(h[:, :n_span])
    return _stack(encoder, layers, version)


def _encoder_device_dtype(encoder: AudioEncoder) -> tuple[torch.device, torch.dtype]:
    weight = encoder.conv1.weight
    return weight.device, weight.dtype


@torch.inference_mode()
def reference_features(encoder: AudioEncoder, pcm: np.ndarray, version: str) -> np.ndarray:
    """Features of a whole clip the reference way: each 30 s segment padded to 30 s.

    The clip is cut into 30 s segments; each is zero-padded to 480000 samples
    (``whisper.audio.pad_or_trim``), turned into a 3000-frame log-mel with
    ``whisper.audio.log_mel_spectrogram`` and run through the full 1500-frame
    encoder; the ``ceil(len / 320)`` frames that cover real audio are kept and the
    segments concatenated. Runs on the encoder's device and dtype.

    Args:
        encoder: Whisper-tiny-layout ``AudioEncoder`` (4 blocks, n_ctx 1500).
        pcm: float32 (samples,) mono audio at 16 kHz, not empty.
        version: MuseTalk version (see :func:`normalize_version`).

    Returns:
        float32 (ceil(samples / 320), 5, d).

    Raises:
        ValueError: empty or non-1-D ``pcm``, or the encoder errors of
            :func:`encoder_layer_stack`.
    """
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1 or pcm.size == 0:
        raise ValueError(f"pcm must be non-empty 1-D audio, got shape {pcm.shape}")
    device, dtype = _encoder_device_dtype(encoder)
    n_mels = encoder.conv1.in_channels
    starts = range(0, pcm.size, SEGMENT_SAMPLES)
    mels = torch.stack(
        [log_mel_spectrogram(pad_or_trim(pcm[s : s + SEGMENT_SAMPLES]), n_mels, device=device) for s in starts]
    )
    stacks = encoder_layer_stack(encoder, mels.to(dtype), version)  # (segments, 1500, 5, d)
    keep = [math.ceil(min(SEGMENT_SAMPLES, pcm.size - s) / FEATURE_SAMPLES) for s in starts]
    return torch.cat([stack[:n] for stack, n in zip(stacks, keep)]).float().cpu().numpy()


def _gather_windows(features: np.ndarray, frames: np.ndarray, version: str, first_feature: int) -> np.ndarray:
    """Windows of video ``frames`` from ``features`` whose row 0 is clip feature frame
    ``first_feature``; the clip edges are feature frame 0 and the last row."""
    version = normalize_version(version)
    features = np.asarray(features)
    if features.ndim != 3 or features.shape[1] != N_STACKED or features.shape[0] == 0:
        raise ValueError(f"features must be (T, {N_STACKED}, d) with T >= 1, got {features.shape}")
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    if frames.size and frames.min() < 0:
        raise ValueError(f"video frame indices must be >= 0, got {frames.min()}")
    wanted = FEATURES_PER_VIDEO_FRAME * frames[:, None] + np.arange(-WINDOW_BEFORE, WINDOW_AFTER)  # (F, 10)
    end = first_feature + features.shape[0]  # one past the clip's last feature frame
    inside = (wanted >= 0) & (wanted < end)
    rows = np.clip(wanted, 0, end - 1) - first_feature
    if rows.min(initial=0) < 0:
        raise ValueError(
            f"window of frame {frames.min()} needs feature frame {wanted.min()}, "
            f"before the span's first ({first_feature})"
        )
    out = features[rows]  # (F, 10, 5, d); v1.0: edge frames repeated
    if version == "v15":
        out = np.where(inside[:, :, None, None], out, 0)
    return out.reshape(frames.size, WINDOW_TOKENS, features.shape[2]).astype(np.float32, copy=False)


def frame_windows(features: np.ndarray, frames: Sequence[int] | np.ndarray, version: str) -> np.ndarray:
    """The (50, d) conditioning windows of several video frames of a clip.

    Frame ``f`` takes feature frames ``2f-4 .. 2f+5``; one past the clip's ends
    v1.0 repeats the first/last feature frame, v1.5 uses zeros. Tokens are
    time-major: token ``t*5 + layer`` is ``features[2f-4+t, layer]``.

    Args:
        features: (T50, 5, d) clip features (e.g. :func:`reference_features`).
        frames: (F,) video frame indices (25 fps), each >= 0.
        version: MuseTalk version (see :func:`normalize_version`).

    Returns:
        float32 (F, 50, d).

    Raises:
        ValueError: a negative frame index, features not (T >= 1, 5, d), or an
            unknown version.
    """
    return _gather_windows(features, np.asarray(frames), version, first_feature=0)


def frame_window(features: np.ndarray, f: int, version: str) -> np.ndarray:
    """The (50, d) float32 window of video frame ``f``; see :func:`frame_windows`."""
    return frame_windows(features, np.array([f]), version)[0]


def _log_mel(pcm: torch.Tensor, n_mels: int, peak: float | None) -> tuple[torch.Tensor, float]:
    """Whisper's log-mel of ``pcm`` (whisper/audio.py, same STFT, filters and scaling)
    with the 8-decade floor taken below ``max(peak, this span's peak)``.

    Returns the (n_mels, len / 160) log-mel and the peak used (log10 power)."""
    window = torch.hann_window(N_FFT, device=pcm.device)
    stft = torch.stft(pcm, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(mel_filters(pcm.device, n_mels) @ power, min=1e-10).log10()
    span_peak = float(log_spec.max())
    peak = span_peak if peak is None else max(peak, span_peak)
    log_spec = torch.maximum(log_spec, torch.tensor(peak - LOG_MEL_DYNAMIC_RANGE, device=pcm.device))
    return (log_spec + 4.0) / 4.0, peak


@dataclass
class StreamState:
    """What a feature stream carries from one :meth:`StreamingFeatureExtractor.windows`
    call to the next within one utterance; make a new one per utterance.

    Attributes:
        peak: highest log10 mel power seen so far in the utterance (None: nothing
            seen). Whisper floors its log-mel 8 decades below the peak of its whole
            30 s input; the stream floors below this running peak instead.
    """

    peak: float | None = None


class StreamingFeatureExtractor:
    """MuseTalk windows of consecutive video frames from a short span of audio.

    Instead of padding every call to Whisper's 30 s, the encoder runs on the frames'
    own audio (``[first/25 - 80 ms, (last+1)/25 + 80 ms)``) widened by left and right
    context. Choices that keep it close to :func:`reference_features` (the drift is
    measured by ``bench/musetalk_feature_drift.py``):

    - Positions: the span's feature frames get the positional-embedding rows of
      their position within their 30 s reference segment (utterance feature index
      mod 1500).
    - The rest of the segment: in the reference, every frame also attends to the
      other 1500 - T positions of its segment, mostly zero padding for utterances
      shorter than 30 s. With ``silence_tokens`` > 0 those positions are treated as
      silence and compressed to about that many tokens, each weighing in attention
      as the positions it stands for (without them the attention sees only the span;
      with random weights that alone drifts by ~45 %).
    - Utterance start: samples before the utterance's sample 0 (the ASR's zero
      padding) are dropped, so Whisper's reflect-padded STFT edge, the
      convolutions' zero padding and the v1.0 clamp / v1.5 zero windows match.
    - Log-mel floor: below the utterance's running peak (:class:`StreamState`).

    Not reproduced: the utterance's audio outside the span (treated as silence);
    the utterance end, which is unknown in advance (the last frames see the ASR's
    trailing zero padding where the reference clamps (v1.0) or zeroes (v1.5) windows);
    the reference's restart every 30 s (the stream's context crosses segment edges).

    The extractor holds no per-stream state (that is :class:`StreamState`), so one
    instance may serve several sessions' threads; the encoder is only read.

    Args:
        encoder: Whisper-tiny-layout ``AudioEncoder`` (4 blocks, n_ctx 1500).
        version: MuseTalk version (see :func:`normalize_version`).
        left_context_ms: audio (ms) before a window's first feature frame; rounded
            up to whole 20 ms feature frames.
        right_context_ms: audio (ms) after a window's last feature frame; rounded up
            to whole 20 ms feature frames.
        device: compute device (default: the encoder's).
        dtype: compute dtype (default: the encoder's).
        silence_tokens: tokens standing for the silent rest of the 30 s segment
            (0: attend within the span only; >= 1500 - span frames: one per position,
            exact).

    Attributes:
        lookbehind_samples: audio before a frame's first sample the caller must
            supply (80 ms + left context), a multiple of 320.
        lookahead_samples: audio after a frame's last sample the caller must supply
            (80 ms + right context), a multiple of 320.

    Raises:
        ValueError: negative context or ``silence_tokens``, an unknown version, or an
            encoder without 4 blocks.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        version: str = "v15",
        left_context_ms: float = DEFAULT_LEFT_CONTEXT_MS,
        right_context_ms: float = DEFAULT_RIGHT_CONTEXT_MS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        silence_tokens: int = DEFAULT_SILENCE_TOKENS,
    ) -> None:
        if left_context_ms < 0 or right_context_ms < 0 or silence_tokens < 0:
            raise ValueError(
                f"context and silence_tokens must be >= 0, got left {left_context_ms} ms, "
                f"right {right_context_ms} ms, silence_tokens {silence_tokens}"
            )
        _check_encoder(encoder)
        self.encoder = encoder
        self.version = normalize_version(version)
        enc_device, enc_dtype = _encoder_device_dtype(encoder)
        self.device = torch.device(device) if device is not None else enc_device
        self.dtype = dtype or enc_dtype
        self.silence_tokens = silence_tokens
        self.left_features = math.ceil(left_context_ms / FEATURE_MS)
        self.right_features = math.ceil(right_context_ms / FEATURE_MS)
        self.lookbehind_samples = WINDOW_LOOKBEHIND_SAMPLES + self.left_features * FEATURE_SAMPLES
        self.lookahead_samples = WINDOW_LOOKAHEAD_SAMPLES + self.right_features * FEATURE_SAMPLES

    def span_samples(self, n_frames: int) -> int:
        """Length (samples) of the span :meth:`windows` takes for ``n_frames`` frames."""
        return self.lookbehind_samples + n_frames * FRAME_SAMPLES + self.lookahead_samples

    @torch.inference_mode()
    def windows(
        self, span_pcm: np.ndarray, n_frames: int, first_frame_index: int, state: StreamState | None = None
    ) -> np.ndarray:
        """(50, d) windows of ``n_frames`` consecutive video frames of an utterance.

        Args:
            span_pcm: float32 16 kHz audio covering
                ``[first_frame_start - lookbehind_samples, last_frame_end + lookahead_samples)``,
                i.e. :meth:`span_samples` ``(n_frames)`` samples; samples before the
                utterance start (zero padding) are ignored.
            n_frames: number of frames (>= 1).
            first_frame_index: utterance-relative index of the first frame (>= 0):
                frame ``i`` starts at utterance sample ``640 * i``.
            state: the utterance's :class:`StreamState`, updated in place; None: the
                log-mel floor comes from this span alone.

        Returns:
            float32 (n_frames, 50, d).

        Raises:
            ValueError: ``n_frames`` < 1, a negative ``first_frame_index``, or a span
                of the wrong length.
        """
        if n_frames < 1 or first_frame_index < 0:
            raise ValueError(f"need n_frames >= 1 and first_frame_index >= 0, got {n_frames}, {first_frame_index}")
        span_pcm = np.asarray(span_pcm, dtype=np.float32).reshape(-1)
        if span_pcm.size != self.span_samples(n_frames):
            raise ValueError(
                f"span of {n_frames} frames must have {self.span_samples(n_frames)} samples "
                f"(lookbehind {self.lookbehind_samples} + {n_frames} x {FRAME_SAMPLES} + lookahead "
                f"{self.lookahead_samples}), got {span_pcm.size}"
            )
        start = first_frame_index * FRAME_SAMPLES - self.lookbehind_samples  # utterance sample of span_pcm[0]
        if start < 0:  # drop the padding before the utterance start
            span_pcm, start = span_pcm[-start:], 0
        if state is None:
            state = StreamState()
        audio = torch.from_numpy(span_pcm).to(self.device)
        mel, state.peak = _log_mel(audio, self.encoder.conv1.in_channels, state.peak)
        mel = mel[None].to(self.dtype)
        first_feature = start // FEATURE_SAMPLES
        n_ctx = self.encoder.positional_embedding.shape[0]
        groups = []
        if self.silence_tokens:
            groups = _silence_groups(first_feature, mel.shape[2] // 2, n_ctx, self.silence_tokens)
        if groups:
            floor = (state.peak - LOG_MEL_DYNAMIC_RANGE + 4.0) / 4.0  # a silent frame's log-mel value
            stack = _segment_layer_stack(self.encoder, mel, self.version, first_feature, floor, groups)
        else:
            stack = encoder_layer_stack(self.encoder, mel, self.version, first_feature)
        frames = first_frame_index + np.arange(n_frames)
        return _gather_windows(stack[0].float().cpu().numpy(), frames, self.version, first_feature)
