"""MuseTalk in the session worker.

``musetalk_model_factory`` loads the weights once per server (``--models_dir``),
prepares the avatar's MuseTalk data (cached on disk), and returns a factory of
per-session :class:`MuseTalkModel` objects that share one
:class:`musetalk.inference.MuseTalkEngine`. Each session's ASR thread is a
``museasr.MuseASR`` computing streaming Whisper features; the inference thread
renders progressive batches; the compositor pastes the faces back.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from basereal import LipSyncModel
from museasr import MuseASR, muse_context_chunks

log = logging.getLogger(__name__)


class MuseTalkModel(LipSyncModel):
    """One session's view of the shared MuseTalk engine (stateless per frame).

    Args:
        engine: the server's ``MuseTalkEngine``.
        extractor: the ``StreamingFeatureExtractor`` for this server's Whisper encoder.
    """

    name = "musetalk"

    def __init__(self, engine, extractor) -> None:
        self.engine = engine
        self.extractor = extractor
        self.lookbehind_chunks, self.lookahead_chunks = muse_context_chunks(extractor)

    def make_asr(self, **kwargs: Any) -> MuseASR:
        return MuseASR(self.extractor, **kwargs)

    def infer(self, features: np.ndarray, loop_indices: Sequence[int]) -> list:
        faces = self.engine.render(features, loop_indices)
        return [self.engine.avatar.paste(i, face) for i, face in zip(loop_indices, faces)]


def musetalk_model_factory(args, avatar) -> Callable[[], MuseTalkModel]:
    """Load MuseTalk for ``avatar`` and return a per-session model factory.

    Args:
        args: server options (``models_dir``, ``musetalk_version``, ``musetalk_dtype``,
            ``musetalk_compile``, ``bbox_shift``,
            ``extra_margin``, ``parsing``, ``l``, ``r``).
        avatar: the shared ``avatar.Avatar``.
    Raises:
        musetalk.models.MissingWeightsError: weights missing or malformed (the
            message names every expected path).
    """
    import torch

    from musetalk.audio_features import DEFAULT_LEFT_CONTEXT_MS, DEFAULT_RIGHT_CONTEXT_MS, StreamingFeatureExtractor
    from musetalk.inference import MuseTalkEngine
    from musetalk.models import load_models
    from musetalk.prepare import prepare_musetalk

    dtype = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.musetalk_dtype]
    models = load_models(args.models_dir, version=args.musetalk_version, dtype=dtype,
                         unet_dir=getattr(args, "musetalk_unet", None), vae_dir=getattr(args, "musetalk_vae", None))
    if torch.device(models.device).type == "cpu":
        log.warning("MuseTalk runs on the CPU: far below real time with the released weights")
    parsing = None
    if args.parsing != "landmarks":
        parsing = models.paths.face_parse
        if parsing is None:
            log.info("no face-parsing weights: blend masks from landmarks")
    mavatar = prepare_musetalk(
        avatar,
        models.vae,
        version=models.version,
        bbox_shift=args.bbox_shift,
        extra_margin=args.extra_margin,
        parsing=parsing,
        parsing_mode=args.parsing if parsing is not None else None,
    )
    extractor = StreamingFeatureExtractor(
        models.whisper,
        models.version,
        # -l/-r may widen the streaming context, never narrow it below the
        # measured minimum (bench/musetalk_feature_drift.py)
        left_context_ms=max(args.l * 20, DEFAULT_LEFT_CONTEXT_MS),
        right_context_ms=max(args.r * 20, DEFAULT_RIGHT_CONTEXT_MS),
        device=models.device,  # in the encoder's float32 (see MuseTalkModels)
    )
    engine = MuseTalkEngine(models, mavatar, compile_mode=None if args.musetalk_compile == "off" else args.musetalk_compile)
    if engine.compile_mode:
        log.info("compiling MuseTalk (%s) for batch sizes %s", engine.compile_mode, engine.buckets)
        engine.warmup()
    log.info("MuseTalk %s ready on %s (%s)", models.version, models.device, models.dtype)
    return lambda: MuseTalkModel(engine, extractor)
