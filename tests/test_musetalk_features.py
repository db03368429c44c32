"""MuseTalk audio features: layer stacks, reference features, frame windows, streaming, MuseASR."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from whisper.audio import N_SAMPLES
from whisper.model import AudioEncoder

from baseasr import AudioInbox, AudioSegment, StageQueue
from clock import FRAME_SAMPLES
from conftest import tone
from musetalk.audio_features import (
    StreamingFeatureExtractor,
    StreamState,
    _block_with_key_bias,
    encoder_layer_stack,
    frame_window,
    frame_windows,
    reference_features,
)
from museasr import MuseASR, muse_context_chunks

D = 32  # tiny encoder width


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(n_mels=80, n_ctx=1500, n_state=D, n_head=4, n_layer=4).eval()


def coded_features(n: int, d: int = 3) -> np.ndarray:
    """(n, 5, d) features whose value names its place: 100 * frame + 10 * layer + channel."""
    i, layer, k = np.meshgrid(np.arange(n), np.arange(5), np.arange(d), indexing="ij")
    return (100 * i + 10 * layer + k + 1).astype(np.float32)  # +1: no real entry is 0


def token(frame: int, layer: int, d: int = 3) -> np.ndarray:
    return 100 * frame + 10 * layer + np.arange(d) + 1.0


# -- frame windows: index arithmetic by hand ----------------------------------------------
# A 0.4 s clip: 20 feature frames (0..19), video frames 0..9. Frame f takes 2f-4 .. 2f+5.
FEATS = coded_features(20)


def test_window_of_frame_0():
    w15, w1 = frame_window(FEATS, 0, "v15"), frame_window(FEATS, 0, "v1")
    assert w15.shape == w1.shape == (50, 3) and w15.dtype == np.float32
    # time steps 0..3 are feature frames -4..-1: zeros (v1.5) / frame 0 repeated (v1.0)
    assert not w15[:20].any()
    for t in range(4):
        for layer in range(5):
            np.testing.assert_array_equal(w1[t * 5 + layer], token(0, layer))
    # time steps 4..9 are feature frames 0..5, token t*5 + layer
    for t in range(4, 10):
        for layer in range(5):
            np.testing.assert_array_equal(w15[t * 5 + layer], token(t - 4, layer))
            np.testing.assert_array_equal(w1[t * 5 + layer], token(t - 4, layer))


def test_window_of_frame_1():
    w15, w1 = frame_window(FEATS, 1, "v1.5"), frame_window(FEATS, 1, "v1.0")
    assert not w15[:10].any()  # feature frames -2, -1
    np.testing.assert_array_equal(w1[0], token(0, 0))
    np.testing.assert_array_equal(w1[9], token(0, 4))
    np.testing.assert_array_equal(w15[10], token(0, 0))  # t = 2 -> frame 0
    np.testing.assert_array_equal(w15[49], token(7, 4))  # t = 9 -> frame 2*1+5 = 7


def test_window_of_a_middle_frame():
    for version in ("v15", "v1"):
        w = frame_window(FEATS, 5, version)  # feature frames 6 .. 15
        np.testing.assert_array_equal(w[0], token(6, 0))
        np.testing.assert_array_equal(w[7], token(7, 2))  # t = 1, layer 2
        np.testing.assert_array_equal(w[23], token(10, 3))  # t = 4, layer 3
        np.testing.assert_array_equal(w[49], token(15, 4))


def test_window_of_the_last_frame():
    w15, w1 = frame_window(FEATS, 9, "v15"), frame_window(FEATS, 9, "v1")  # feature frames 14 .. 23
    for w in (w15, w1):
        np.testing.assert_array_equal(w[0], token(14, 0))
        np.testing.assert_array_equal(w[29], token(19, 4))  # t = 5 -> frame 19, the clip's last
    assert not w15[30:].any()  # frames 20..23: zeros (v1.5)
    for t in range(6, 10):  # ... the last frame repeated (v1.0)
        for layer in range(5):
            np.testing.assert_array_equal(w1[t * 5 + layer], token(19, layer))


def test_frame_windows_vectorised_and_errors():
    frames = np.array([0, 1, 5, 9, 12])
    for version in ("v15", "v1"):
        batch = frame_windows(FEATS, frames, version)
        assert batch.shape == (5, 50, 3)
        for i, f in enumerate(frames):
            np.testing.assert_array_equal(batch[i], frame_window(FEATS, f, version))
    assert not frame_windows(FEATS, [12], "v15").any()  # wholly past the clip end
    with pytest.raises(ValueError):
        frame_window(FEATS, -1, "v15")
    with pytest.raises(ValueError):
        frame_window(FEATS, 0, "v2")
    with pytest.raises(ValueError):
        frame_window(FEATS[:, :4], 0, "v15")


# -- encoder layer stack ----------------------------------------------------------------------
def test_layer_stack_shapes_and_ln_post(encoder):
    mel = torch.randn(2, 80, 10)
    s15, s1 = encoder_layer_stack(encoder, mel, "v15"), encoder_layer_stack(encoder, mel, "v1")
    assert s15.shape == s1.shape == (2, 5, 5, D)
    torch.testing.assert_close(s15[:, :, :4], s1[:, :, :4])  # input + blocks 1..3: same
    assert not torch.allclose(s15[:, :, 4], s1[:, :, 4])  # block 4: ln_post for v1.5 only
    with torch.inference_mode():
        torch.testing.assert_close(s15[:, :, 4], encoder.ln_post(s1[:, :, 4]))
    with pytest.raises(ValueError):
        encoder_layer_stack(encoder, torch.randn(1, 80, 9), "v15")


def test_layer_stack_matches_whisper_forward_on_30s(encoder):
    mel = torch.randn(1, 80, 3000)
    with torch.inference_mode():
        expected = encoder(mel)
    torch.testing.assert_close(encoder_layer_stack(encoder, mel, "v15")[:, :, 4], expected)


def test_layer_stack_positions_wrap_at_the_segment(encoder):
    mel = torch.randn(1, 80, 4)
    pe = encoder.positional_embedding
    moved = encoder_layer_stack(encoder, mel, "v1", pos_offset=1499)[0, :, 0]
    shift = moved - encoder_layer_stack(encoder, mel, "v1")[0, :, 0]
    torch.testing.assert_close(shift, pe[[1499, 0]] - pe[[0, 1]])


def test_key_bias_weighs_a_key_as_copies(encoder):
    """A token with key bias log(3) acts on the others as 3 copies of it."""
    block = encoder.blocks[0]
    x = torch.randn(1, 5, D)
    with torch.inference_mode():
        torch.testing.assert_close(_block_with_key_bias(block, x, torch.zeros(5)), block(x))
        copies = torch.cat([x, x[:, 4:].expand(1, 2, D)], dim=1)
        bias = torch.tensor([0.0, 0, 0, 0, np.log(3)])
        torch.testing.assert_close(_block_with_key_bias(block, x, bias)[:, :4], block(copies)[:, :4])


# -- reference features -----------------------------------------------------------------------
def test_reference_features_lengths_and_segments(encoder):
    rng = np.random.default_rng(0)
    one = (0.1 * rng.standard_normal(16100)).astype(np.float32)
    assert reference_features(encoder, one[:16000], "v15").shape == (50, 5, D)
    assert reference_features(encoder, one, "v15").shape == (51, 5, D)  # ceil(16100 / 320)
    long = (0.1 * rng.standard_normal(31 * 16000)).astype(np.float32)
    feats = reference_features(encoder, long, "v15")
    assert feats.shape == (1550, 5, D) and feats.dtype == np.float32
    # the second segment is the last second on its own (padded to 30 s, positions from 0)
    np.testing.assert_allclose(feats[1500:], reference_features(encoder, long[N_SAMPLES:], "v15"), atol=1e-5)
    with pytest.raises(ValueError):
        reference_features(encoder, np.zeros(0, np.float32), "v15")


# -- streaming ----------------------------------------------------------------------------------
def test_streaming_span_equal_to_the_segment_matches_the_reference(encoder):
    """With the context reaching over the whole 30 s segment the stream computes the reference."""
    for version in ("v15", "v1"):
        ex = StreamingFeatureExtractor(encoder, version, left_context_ms=30_000, right_context_ms=0)
        n = (N_SAMPLES - ex.lookahead_samples) // FRAME_SAMPLES  # the span ends at 30 s exactly
        assert n * FRAME_SAMPLES + ex.lookahead_samples == N_SAMPLES
        clip = np.tile(tone(1.0, 300) + tone(1.0, 1100, 0.1), 30)[: n * FRAME_SAMPLES]
        span = np.pad(clip, (ex.lookbehind_samples, ex.lookahead_samples))
        stream = ex.windows(span, n, 0)
        assert stream.shape == (n, 50, D) and stream.dtype == np.float32
        ref = frame_windows(reference_features(encoder, clip, version), np.arange(n), version)
        inner = 2 * np.arange(n) + 5 < 2 * n  # reference windows inside the clip
        np.testing.assert_allclose(stream[inner], ref[inner], atol=2e-4, rtol=1e-4)


def test_streaming_context_and_errors(encoder):
    ex = StreamingFeatureExtractor(encoder, "v15", left_context_ms=30, right_context_ms=40)
    assert ex.lookbehind_samples == 1280 + 640  # 80 ms + 30 ms rounded up to 40 ms
    assert ex.lookahead_samples == 1280 + 640
    assert muse_context_chunks(ex) == (6, 6)
    assert ex.span_samples(3) == 1920 + 3 * 640 + 1920
    with pytest.raises(ValueError):
        ex.windows(np.zeros(100, np.float32), 1, 0)
    with pytest.raises(ValueError):
        StreamingFeatureExtractor(encoder, "v15", left_context_ms=-20)


def test_streaming_state_keeps_the_running_peak(encoder):
    ex = StreamingFeatureExtractor(encoder, "v15", 40, 40)
    loud = np.concatenate([tone(0.2, level=0.5), np.zeros(ex.span_samples(1), np.float32)])
    state = StreamState()
    ex.windows(loud[: ex.span_samples(1)], 1, 0, state)
    peak = state.peak
    quiet = 0.01 * loud[: ex.span_samples(1)]
    later = ex.windows(quiet, 1, 20, state)
    assert state.peak == peak  # the floor stays below the utterance's loudest part
    assert not np.allclose(later, ex.windows(quiet, 1, 20))  # a fresh stream floors below the quiet span


# -- MuseASR in a real BaseASR pipeline -----------------------------------------------------
def test_muse_asr_pipeline_matches_the_extractor(encoder):
    ex = StreamingFeatureExtractor(encoder, "v15", left_context_ms=40, right_context_ms=40, silence_tokens=32)
    # speech 0.4 s (frames 0-9), silence 0.32 s, speech 0.3 s: with 120 ms lookahead and a
    # 3-frame hangover, frames 13-14 are silent, so group 8-15 has a gap (8-12, 15)
    pcm = np.concatenate([tone(0.4, 300), np.zeros(int(0.32 * 16000), np.float32), tone(0.3, 500)])
    pcm[:80] = 0.9  # a click: the utterance's loudest part is in the first span
    out: StageQueue = StageQueue(1000)
    inbox = AudioInbox(60)
    stop = threading.Event()
    asr = MuseASR(ex, out_queue=out, inbox=inbox, epoch=lambda: 0, loop_hint=lambda: 0, stop_event=stop)
    asr.start()
    inbox.put(AudioSegment(pcm, epoch=0, end_of_utterance=True))
    units = []
    while not units or not units[-1].final:
        unit = out.get(timeout=10.0)
        assert unit is not None, "ASR stalled"
        units.append(unit)
    stop.set()
    asr.join(2)

    speech = [u.index for u in units if u.speech]
    assert speech[:13] == list(range(13)) and 13 not in speech and 14 not in speech and 15 in speech
    assert all(u.features is None for u in units if not u.speech)
    # expected: one extractor call per run of consecutive speech frames within each group of 8
    frames = len(units)
    utterance = np.pad(pcm, (ex.lookbehind_samples, frames * FRAME_SAMPLES + ex.lookahead_samples - pcm.size))
    state = StreamState()
    expected = {}
    for group in range(0, frames, 8):
        idx = [i for i in speech if group <= i < group + 8]
        runs = np.split(np.array(idx), np.flatnonzero(np.diff(idx) != 1) + 1) if idx else []
        for run in runs:
            first, n = int(run[0]), len(run)
            span = utterance[first * FRAME_SAMPLES : first * FRAME_SAMPLES + ex.span_samples(n)]
            expected.update(zip(run.tolist(), ex.windows(span, n, first, state)))
    for u in units:
        if u.speech:
            assert u.features.shape == (50, D) and u.features.dtype == np.float32
            np.testing.assert_allclose(u.features, expected[u.index], atol=1e-5)
