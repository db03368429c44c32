"""The MuseTalk ASR thread: streaming Whisper feature windows for speech frames.

:class:`MuseASR` is a :class:`baseasr.BaseASR` whose features are MuseTalk's (50, d)
Whisper windows (``musetalk.audio_features``). BaseASR hands it the context windows
of up to ``feature_batch`` speech frames at a time; MuseASR runs ONE encoder pass
per run of consecutive frames over the union of their windows
(:class:`~musetalk.audio_features.StreamingFeatureExtractor`), with the frames'
utterance-relative indices (Whisper positions, utterance-start handling) and the
utterance's :class:`~musetalk.audio_features.StreamState` (log-mel peak).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from baseasr import BaseASR
from clock import CHUNK_SAMPLES, FRAME_SAMPLES
from musetalk.audio_features import StreamingFeatureExtractor, StreamState

__all__ = ["MuseASR", "muse_context_chunks"]


def muse_context_chunks(extractor: StreamingFeatureExtractor) -> tuple[int, int]:
    """(lookbehind_chunks, lookahead_chunks): the extractor's audio context around a
    frame in 20 ms chunks, rounded up (the session's ``LipSyncModel`` attributes)."""
    return (
        math.ceil(extractor.lookbehind_samples / CHUNK_SAMPLES),
        math.ceil(extractor.lookahead_samples / CHUNK_SAMPLES),
    )


class MuseASR(BaseASR):
    """BaseASR whose speech frames get MuseTalk (50, d) float32 Whisper windows.

    BaseASR passes the speech frames of a group with their utterance indices
    (silent frames are left out); each run of consecutive frames is one encoder
    pass, positioned by the run's first index.

    Args:
        extractor: the (shareable) streaming extractor; its lookbehind/lookahead
            set the ASR's context.
        **kwargs: the other :class:`baseasr.BaseASR` arguments (queue, inbox,
            epoch, loop hint, stop event, VAD settings, name).

    Raises:
        ValueError: the extractor's context is not a whole number of 20 ms chunks.
    """

    def __init__(self, extractor: StreamingFeatureExtractor, **kwargs: Any) -> None:
        lookbehind, lookahead = muse_context_chunks(extractor)
        context = (extractor.lookbehind_samples, extractor.lookahead_samples)
        if (lookbehind * CHUNK_SAMPLES, lookahead * CHUNK_SAMPLES) != context:
            raise ValueError("the extractor's context must be whole 20 ms chunks")
        self.extractor = extractor
        super().__init__(features=None, lookbehind_chunks=lookbehind, lookahead_chunks=lookahead, **kwargs)

    def _reset_utterance(self, epoch: int) -> None:
        super()._reset_utterance(epoch)
        self._stream = StreamState()

    def compute_features(self, windows: list[np.ndarray], indices: list[int]) -> list[np.ndarray]:
        """Features of speech frames: one encoder pass per run of consecutive frames,
        over the union of the run's windows (the first window, then the last 640
        samples of each later one).

        Args:
            windows: context windows (float32, ``lookbehind + 640 + lookahead``
                samples), in frame order.
            indices: the frames' utterance indices (the Whisper positions).

        Returns:
            one float32 (50, d) array per window.
        """
        out: list[np.ndarray] = []
        run_start = 0
        for i in range(1, len(windows) + 1):
            if i == len(windows) or indices[i] != indices[i - 1] + 1:
                run = windows[run_start:i]
                span = np.concatenate([run[0]] + [w[-FRAME_SAMPLES:] for w in run[1:]])
                out.extend(self.extractor.windows(span, len(run), indices[run_start], self._stream))
                run_start = i
        return out
