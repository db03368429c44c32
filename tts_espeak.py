"""espeak: formant TTS with espeak-ng (from espeakng-loader) through ctypes (the fallback).

espeak-ng is one process-global C library: its voice and rate are global
settings, so every synthesis selects its voice and synthesises under one lock.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from audio import resample
from tts import TTS, voice_info

__all__ = ["EspeakTTS", "ESPEAK_VOICES"]

logger = logging.getLogger("tts")

# The voices offered (when this espeak-ng's data has them), as espeak-ng's
# SetVoiceByName takes them ("en" is British English): a language alone is espeak's male voice; "+f3" adds its female3 variant (pitch 140-240 Hz), "+m3"
# its male3. Any other espeak-ng voice name may be given to the constructor.
ESPEAK_VOICES = (
    "en-us", "en-us+f3", "en-us+m3",
    "en", "en+f3", "en-gb-scotland", "en-gb-x-rp", "en-029",
    "de", "de+f3", "fr", "fr+f3", "es", "es+f3", "es-419", "it", "it+f3",
    "pt-br", "pt-br+f3", "nl", "sv", "pl", "ru", "cmn", "hi",
)

# espeak-ng C API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_ESPEAK_RATE = 1
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """Process-wide espeak-ng state (the C library is one global instance)."""

    lock = threading.RLock()
    lib: Optional[ctypes.CDLL] = None
    data_path: Optional[Path] = None  # .../espeak-ng-data
    sample_rate: int = 0
    callback = None  # keeps the ctypes callback alive
    buffer: list[bytes] = []
    voice: Optional[str] = None  # what the engine is set to now
    rate: Optional[int] = None
    known: dict[str, bool] = {}  # voice name -> espeak accepted it

    @classmethod
    def ensure(cls) -> None:
        """Load and initialise libespeak-ng once (call with ``lock`` held)."""
        if cls.lib is not None:
            return
        import espeakng_loader

        lib_path = espeakng_loader.get_library_path()
        data_path = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int

        # The path is the directory that *contains* espeak-ng-data.
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path.parent).encode(), _ESPEAK_INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {data_path}")

        def on_audio(wav, numsamples, events):  # runs inside espeak_Synth, lock held
            if wav and numsamples > 0:
                cls.buffer.append(ctypes.string_at(wav, numsamples * 2))
            return 0  # continue synthesis

        cls.callback = _SYNTH_CALLBACK(on_audio)
        lib.espeak_SetSynthCallback(cls.callback)
        cls.lib, cls.sample_rate, cls.data_path = lib, int(rate), data_path
        logger.info("espeak-ng loaded from %s (%d Hz)", lib_path, rate)

    @classmethod
    def select(cls, voice: str, rate: int) -> None:
        """Set the engine's voice and rate (lock held).

        Raises:
            ValueError: espeak-ng does not know the voice.
        """
        if cls.voice != voice:
            if cls.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                cls.voice = None
                cls.known[voice] = False
                raise ValueError(f"unknown espeak-ng voice {voice!r}")
            cls.known[voice] = True
            cls.voice = voice
            cls.rate = None  # a voice change resets the rate
        if cls.rate != rate:
            cls.lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
            cls.rate = rate

    @classmethod
    def accepts(cls, voice: str) -> bool:
        """Whether espeak-ng can select ``voice`` (lock held; the engine's voice may change)."""
        if voice not in cls.known:
            try:
                cls.select(voice, cls.rate or 175)
            except ValueError:
                pass
        return cls.known[voice]


def _lang_index(data_path: Path) -> dict[str, dict]:
    """espeak-ng-data/lang: each file's name and its ``language`` codes -> its fields."""
    index: dict[str, dict] = {}
    for f in sorted((data_path / "lang").rglob("*")):
        if not f.is_file():
            continue
        fields = {"name": f.name, "languages": [], "gender": None}
        try:
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "name":
                fields["name"] = " ".join(parts[1:])
            elif len(parts) >= 2 and parts[0] == "language":
                fields["languages"].append(parts[1])
            elif len(parts) >= 2 and parts[0] == "gender":
                fields["gender"] = parts[1]
        for key in [f.name] + fields["languages"]:
            index.setdefault(key.lower(), fields)
    return index


def _variant(data_path: Path, variant: str) -> tuple[str, Optional[str]]:
    """(name, gender) of a voice variant in espeak-ng-data/voices/!v ("f3" -> ("female3", "female"))."""
    name, gender = variant, None
    try:
        for line in (data_path / "voices" / "!v" / variant).read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "name":
                name = " ".join(parts[1:])
            elif len(parts) >= 2 and parts[0] == "gender":
                gender = parts[1]
    except OSError:
        pass
    return name, gender


def _bcp47(code: str) -> str:
    """espeak's "en-us" -> "en-US", "en-gb-scotland" -> "en-GB-scotland"; "cmn" stays."""
    head, *rest = code.split("-")
    out, private = [head.lower()], False
    for part in rest:
        private = private or part.lower() == "x"  # after "x-" subtags are private: kept as they are
        out.append(part.upper() if len(part) == 2 and not private else part)
    return "-".join(out)


def _describe(voice: str, index: dict[str, dict], data_path: Path) -> dict:
    """The :func:`tts.voice_info` of an espeak-ng voice name such as "en-us+f3"."""
    lang, _, variant = voice.partition("+")
    fields = index.get(lang.lower(), {})
    name = fields.get("name", lang)
    gender = fields.get("gender") or "male"  # espeak-ng's language voices are male
    if variant:
        vname, vgender = _variant(data_path, variant)
        name, gender = f"{name}, {vname}", vgender or gender
    languages = fields.get("languages") or [lang]
    return voice_info(voice, name, _bcp47(languages[0]), gender)


class EspeakTTS(TTS):
    """Formant TTS with espeak-ng (from espeakng-loader) via ctypes.

    Robotic but very fast (seconds of speech in milliseconds) and tiny; the
    fallback when piper is unavailable. espeak-ng is a process-global C
    library, so all instances share it: each synthesis selects its voice and
    rate and synthesises under one lock, so concurrent threads each get their
    own voice. Its 22050 Hz int16 output is converted to 16000 Hz float32.

    :meth:`voices` lists :data:`ESPEAK_VOICES` that this espeak-ng's data has
    (English, with female and male variants, and a few other languages), plus
    the constructor's voice.

    Args:
        voice: the default espeak-ng voice name, e.g. "en-us", "en-us+f3", "de".
        rate: speaking rate in words per minute (espeak default 175).

    Raises:
        ImportError: espeakng-loader is not installed.
        OSError: the shared library cannot be loaded.
        RuntimeError: espeak-ng fails to initialise.
        ValueError: the voice name is unknown.
    """

    name = "espeak"

    _catalog: Optional[list[dict]] = None  # ESPEAK_VOICES that espeak-ng accepts, built once

    def __init__(self, voice: str = "en-us", rate: int = 175) -> None:
        self.voice = voice
        self.rate = int(rate)
        with _Espeak.lock:
            _Espeak.ensure()
            catalog = self._build_catalog()
            try:
                _Espeak.select(self.voice, self.rate)
            except ValueError:
                offered = ", ".join(v["id"] for v in catalog)
                raise ValueError(f"unknown espeak-ng voice {voice!r}; offered: {offered} (or any espeak-ng voice name)") from None
            self._infos = [dict(v) for v in catalog]
            if voice not in {v["id"] for v in catalog}:
                self._infos.insert(0, _describe(voice, _lang_index(_Espeak.data_path), _Espeak.data_path))
        self.default_voice = voice
        self.sample_rate_in = _Espeak.sample_rate

    @classmethod
    def _build_catalog(cls) -> list[dict]:
        """The offered voices that espeak-ng accepts (lock held; built once)."""
        if cls._catalog is None:
            index = _lang_index(_Espeak.data_path)
            cls._catalog = [_describe(v, index, _Espeak.data_path) for v in ESPEAK_VOICES if _Espeak.accepts(v)]
        return cls._catalog

    def voices(self) -> list[dict]:
        """The offered voices, the default first; see :meth:`tts.TTS.voices`."""
        infos = sorted(self._infos, key=lambda v: v["id"] != self.default_voice)
        return [dict(v) for v in infos]

    def _synth(self, sentence: str, voice: str) -> np.ndarray:
        """float32 (samples,) mono at 16000 Hz in [-1, 1].

        Raises:
            RuntimeError: espeak_Synth reports an error.
        """
        text = ctypes.create_string_buffer(sentence.encode("utf-8"))
        with _Espeak.lock:
            _Espeak.select(voice, self.rate)
            _Espeak.buffer = []
            err = _Espeak.lib.espeak_Synth(
                text, len(text), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
            )
            raw = b"".join(_Espeak.buffer)
            _Espeak.buffer = []
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        pcm = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
        if pcm.size == 0:
            return np.zeros(0, dtype=np.float32)
        out = resample(pcm, self.sample_rate_in, self.sample_rate_out)
        return np.clip(out, -1.0, 1.0, out=out)
