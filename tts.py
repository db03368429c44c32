"""Text-to-speech: one small interface, several backends, sentence by sentence.

Backends (one module each, all re-exported here; :func:`make_tts` picks one by name):

* ``piper`` -- :class:`PiperTTS` (``tts_piper.py``): neural, offline, the bundled
  ``en_US-joe-medium`` voice (~0.07 real-time factor on a small CPU). The default.
* ``espeak`` -- :class:`EspeakTTS` (``tts_espeak.py``): espeak-ng through ctypes;
  robotic, tiny, very fast, many languages. The fallback.
* ``edge`` -- :class:`EdgeTTS` (``tts_edge.py``): Microsoft Edge's online voices
  through the ``edge-tts`` package (streamed MP3, decoded with PyAV). Optional.
* ``openai`` -- :class:`OpenAITTS` (``tts_openai.py``): any OpenAI-compatible
  ``POST /v1/audio/speech`` endpoint (``--tts_url``, key from ``$TTS_API_KEY``),
  streamed as 24 kHz s16le ``pcm``. Optional.

Every backend returns mono float32 PCM at ``SAMPLE_RATE`` (16 kHz) in [-1, 1]:

* :meth:`TTS.synthesize` -- one sentence, whole.
* :meth:`TTS.stream_chunks` -- one sentence, in pieces as the backend produces
  them (online backends deliver audio progressively), converted to 16 kHz by one
  stateful :class:`ResampledStream` per sentence, so no sample is lost or doubled
  at a piece's edge.
* :meth:`TTS.sentences` / :meth:`TTS.stream` -- text split with
  :func:`split_sentences` (long sentences at clause boundaries), synthesised
  lazily one sentence at a time.

Each takes an optional ``voice`` (an id from :meth:`TTS.voices`; None: the
backend's :attr:`TTS.default_voice`); an unknown voice raises ``ValueError``
naming the available ones. Several sessions may synthesise from different threads
at once, each with its own voice. Online backends raise :class:`TTSError` naming
the backend and its URL when the service cannot be reached, answers an error, or
stalls (connect and read timeouts bound every wait).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
from typing import Any, Iterator, Optional

import numpy as np

from audio import StreamResampler
from clock import SAMPLE_RATE  # 16000 Hz

__all__ = [
    "SAMPLE_RATE",
    "TTS",
    "TTSError",
    "PiperTTS",
    "EspeakTTS",
    "EdgeTTS",
    "OpenAITTS",
    "ResampledStream",
    "TTS_CHOICES",
    "add_arguments",
    "make_tts",
    "options_from_args",
    "split_sentences",
    "voice_info",
]

logger = logging.getLogger(__name__)

TTS_CHOICES = ("auto", "piper", "espeak", "edge", "openai", "none")
DEFAULT_MAX_CHARS = 200  # longest piece split_sentences hands to a backend (characters)
DEFAULT_TIMEOUT_S = 10.0  # online backends: longest wait to connect, or for the next bytes (s)
TOTAL_TIMEOUT_S = 60.0  # online backends: longest time one sentence's audio may take (s)
MAX_VOICES_IN_ERROR = 12  # an unknown-voice error names at most this many voices
TTS_API_KEY_ENV = "TTS_API_KEY"  # environment variable with the --tts_url endpoint's key

# Backend classes, imported on first use (``tts.PiperTTS`` or ``from tts import
# EdgeTTS``): the online backends' packages load only when asked for.
_BACKENDS = {
    "PiperTTS": "tts_piper",
    "EspeakTTS": "tts_espeak",
    "EdgeTTS": "tts_edge",
    "OpenAITTS": "tts_openai",
}


def _backend(name: str) -> type:
    """The backend class ``name`` (a key of ``_BACKENDS``), imported on first use."""
    cls = getattr(importlib.import_module(_BACKENDS[name]), name)
    globals()[name] = cls  # later look-ups skip __getattr__
    return cls


def __getattr__(name: str) -> Any:
    if name not in _BACKENDS:
        raise AttributeError(f"module 'tts' has no attribute {name!r}")
    return _backend(name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BACKENDS))


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
# The interface
# ---------------------------------------------------------------------------


class TTSError(RuntimeError):
    """An online backend failed; ``str(err)`` names the backend and URL and says how.

    Attributes:
        backend: the backend's name ("edge", "openai").
        url: the service's URL.
        kind: ``"unreachable"`` (no connection), ``"timeout"`` (connect, first
            bytes or between bytes, or the sentence's total time),
            ``"status"`` (an HTTP error status), ``"stream"`` (a malformed,
            failed or empty answer).
        status: the HTTP status for ``"status"``, else None.
    """

    def __init__(self, backend: str, url: str, kind: str, detail: str, status: Optional[int] = None) -> None:
        what = {
            "unreachable": "is unreachable",
            "timeout": "timed out",
            "status": f"answered HTTP {status}",
        }.get(kind, "failed")
        super().__init__(f"{backend} TTS at {url} {what}: {detail}")
        self.backend = backend
        self.url = url
        self.kind = kind
        self.status = status

    @property
    def http_status(self) -> int:
        """The status for an answer to our own client: 504 for a timeout, else 502."""
        return 504 if self.kind == "timeout" else 502


def voice_info(
    id: str, name: Optional[str] = None, language: Optional[str] = None, gender: Optional[str] = None
) -> dict:
    """One entry of :meth:`TTS.voices`: ``{"id", "name", "language", "gender"}``.

    Args:
        id: what ``voice=`` takes.
        name: for people (default: the id).
        language: BCP 47 tag such as "en-US" (None: unknown or any).
        gender: "female", "male", "neutral", or None where unknown.
    """
    return {"id": id, "name": name or id, "language": language, "gender": gender}


class ResampledStream:
    """One stream's conversion to ``rate_out``: pieces in, pieces out, state carried.

    Wraps one :class:`audio.StreamResampler` (libswresample) for a whole stream,
    so the filter runs across every piece's edge: no sample is lost, doubled or
    clicked there, and the output does not depend on how the input was cut.
    :meth:`finish` pushes the filter's tail out and cuts the total to exactly
    ``ceil(n_in * rate_out / rate_in)`` samples, the length (and the samples)
    that :func:`audio.resample` gives for the whole input at once. Pieces are
    clipped to [-1, 1]. Not thread-safe: one per stream.

    Args:
        rate_in: input sample rate (Hz, > 0).
        rate_out: output sample rate (Hz, > 0; default 16000).
    """

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE) -> None:
        self._resampler = StreamResampler(rate_in, rate_out)
        self.rate_in, self.rate_out = self._resampler.rate_in, self._resampler.rate_out
        self.n_in = 0  # input samples so far
        self.n_out = 0  # output samples so far

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """float32 (n,) at ``rate_in`` -> float32 (m,) at ``rate_out`` (m may be 0;
        the filter holds back ~1 ms until the next piece or :meth:`finish`)."""
        x = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        self.n_in += x.shape[0]
        return self._out(self._resampler.process(x), None)

    def finish(self) -> np.ndarray:
        """The rest of the stream (float32, at ``rate_out``); the object is then spent."""
        target = -(-self.n_in * self.rate_out // self.rate_in)
        if self.rate_in == self.rate_out:
            return np.zeros(0, np.float32)
        # silence after the last sample pushes the filter's whole tail out (audio.resample does the same)
        pad = np.zeros(64 * -(-self.rate_in // self.rate_out) + 64, np.float32)
        tail = np.concatenate([self._resampler.process(pad), self._resampler.flush()])
        return self._out(tail, target)

    def _out(self, y: np.ndarray, target: Optional[int]) -> np.ndarray:
        if target is not None:
            need = target - self.n_out
            if y.shape[0] < need:  # never seen; keeps the length contract
                y = np.concatenate([y, np.zeros(need - y.shape[0], np.float32)])
            y = y[: max(0, need)]
        self.n_out += y.shape[0]
        return np.clip(y, -1.0, 1.0)


_EMPTY = np.zeros(0, dtype=np.float32)


class TTS:
    """Base class of the text-to-speech backends.

    A backend implements :meth:`_synth` (whole sentence) or :meth:`_chunks`
    (pieces as they are produced), or both, and :meth:`voices`; everything
    public is defined here in terms of them. Instances are safe to use from
    several threads at once, each call with its own voice.

    Attributes:
        name: backend name as accepted by :func:`make_tts` ("piper", "espeak",
            "edge", "openai").
        sample_rate_out: sample rate of every returned array, in Hz (16000).
        default_voice: the voice used when a call names none (an id of
            :meth:`voices`).
    """

    name: str = "base"
    sample_rate_out: int = SAMPLE_RATE
    default_voice: str = "default"

    # -- voices ------------------------------------------------------------------------

    def voices(self) -> list[dict]:
        """The voices this backend offers, default first where it can.

        Returns:
            list of ``{"id", "name", "language", "gender"}`` (:func:`voice_info`;
            ``language`` and ``gender`` are None where unknown). Fresh copies:
            the caller may change them.
        """
        return [voice_info(self.default_voice)]

    def check_voice(self, voice: Optional[str] = None) -> str:
        """Validate a voice name (for a request, before any synthesis).

        Args:
            voice: an id of :meth:`voices` (case-insensitive), or None / "" for
                :attr:`default_voice`.

        Returns:
            the voice's id as :meth:`voices` spells it.

        Raises:
            ValueError: unknown voice; the message names the available ones.
        """
        if voice is None or voice == "":
            return self.default_voice
        ids = [v["id"] for v in self.voices()]
        if voice in ids:
            return voice
        folded = {i.casefold(): i for i in ids}
        if isinstance(voice, str) and voice.casefold() in folded:
            return folded[voice.casefold()]
        shown = ", ".join(ids[:MAX_VOICES_IN_ERROR])
        more = f" and {len(ids) - MAX_VOICES_IN_ERROR} more (GET /voices)" if len(ids) > MAX_VOICES_IN_ERROR else ""
        raise ValueError(f"unknown {self.name} voice {voice!r}; available: {shown}{more}")

    # -- synthesis ---------------------------------------------------------------------

    def synthesize(self, sentence: str, voice: Optional[str] = None) -> np.ndarray:
        """Synthesise one sentence, whole.

        Args:
            sentence: text to speak (normally one sentence from
                :func:`split_sentences`; longer text works but is returned only
                when all of it is done).
            voice: an id of :meth:`voices`; None: :attr:`default_voice`.

        Returns:
            float32 array of shape (samples,), mono, at ``sample_rate_out``
            (16000 Hz), values in [-1, 1]. Empty (shape (0,)) for text that
            produces no sound (blank or punctuation only).

        Raises:
            ValueError: unknown voice (checked before any work).
            TTSError: an online backend failed (unreachable, error, timeout).
        """
        v = self.check_voice(voice)
        if not sentence or not sentence.strip():
            return _EMPTY.copy()
        return self._synth(sentence, v)

    def stream_chunks(self, sentence: str, voice: Optional[str] = None) -> Iterator[np.ndarray]:
        """Synthesise one sentence, yielding audio as the backend produces it.

        Online backends yield a piece per network read (tens of ms each); piper
        a piece per sentence it speaks; espeak the sentence whole. All pieces of
        one call go through one :class:`ResampledStream`, so together they are
        exactly the sentence's audio, converted once: ``ceil(n * 16000 / rate)``
        samples for ``n`` at the backend's rate, the same samples whatever the
        pieces (for online backends and piper :meth:`synthesize` is their
        concatenation). Stopping the iteration early (``close()``) drops the
        request in flight.

        Args:
            sentence: text to speak.
            voice: an id of :meth:`voices`; None: :attr:`default_voice`.

        Returns:
            an iterator of non-empty float32 (samples,) arrays, mono, 16000 Hz,
            in [-1, 1]; nothing for blank text.

        Raises:
            ValueError: unknown voice (raised here, before iterating).
            TTSError: (while iterating) an online backend failed; pieces already
                yielded stay valid.
        """
        v = self.check_voice(voice)
        return self._iter_chunks(sentence, v)

    def _iter_chunks(self, sentence: str, voice: str) -> Iterator[np.ndarray]:
        if not sentence or not sentence.strip():
            return
        for piece in self._chunks(sentence, voice):
            if piece.size:
                yield np.asarray(piece, dtype=np.float32)

    def stream(
        self, text: str, max_chars: int = DEFAULT_MAX_CHARS, voice: Optional[str] = None
    ) -> Iterator[np.ndarray]:
        """Synthesise text lazily, one sentence at a time.

        The text is split with :func:`split_sentences`; each sentence is
        synthesised only when the previous array has been consumed, so the
        caller can start playing the first sentence before the later ones
        exist. Sentences that produce no audio are skipped.

        Args:
            text: any text.
            max_chars: passed to :func:`split_sentences`.
            voice: an id of :meth:`voices`; None: :attr:`default_voice`.

        Returns:
            an iterator of float32 (samples,) arrays, mono, 16000 Hz, one per
            sentence, in order.

        Raises:
            ValueError: unknown voice (raised here, before iterating).
            TTSError: (while iterating) an online backend failed.
        """
        pairs = self.sentences(text, max_chars, voice=voice)  # validates the voice now
        return (audio for _, audio in pairs)

    def sentences(
        self, text: str, max_chars: int = DEFAULT_MAX_CHARS, voice: Optional[str] = None
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Like :meth:`stream`, with each sentence's text.

        Returns:
            an iterator of (sentence, float32 (samples,) mono 16 kHz audio);
            sentences that produce no audio are skipped.

        Raises:
            ValueError: unknown voice (raised here, before iterating).
            TTSError: (while iterating) an online backend failed.
        """
        if voice is not None:
            voice = self.check_voice(voice)
        return self._iter_sentences(text, max_chars, voice)

    def _iter_sentences(self, text: str, max_chars: int, voice: Optional[str]) -> Iterator[tuple[str, np.ndarray]]:
        for sentence in split_sentences(text, max_chars=max_chars):
            audio = self.synthesize(sentence) if voice is None else self.synthesize(sentence, voice=voice)
            if audio.size:
                yield sentence, audio

    # -- what a backend implements -----------------------------------------------------

    def _synth(self, sentence: str, voice: str) -> np.ndarray:
        """One non-blank sentence in a validated voice -> float32 (samples,) 16 kHz.
        Default: the concatenation of :meth:`_chunks`."""
        if type(self)._chunks is TTS._chunks:
            raise NotImplementedError(f"{type(self).__name__} implements neither _synth nor _chunks")
        pieces = [p for p in self._chunks(sentence, voice) if p.size]
        if not pieces:
            return _EMPTY.copy()
        return np.concatenate(pieces).astype(np.float32, copy=False)

    def _chunks(self, sentence: str, voice: str) -> Iterator[np.ndarray]:
        """One non-blank sentence in a validated voice -> float32 16 kHz pieces.
        Default: :meth:`synthesize`'s array, whole."""
        if voice == self.default_voice:
            yield self.synthesize(sentence)  # subclasses written before voices took no voice
        else:
            yield self.synthesize(sentence, voice=voice)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, default_voice={self.default_voice!r})"


# ---------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------


def make_tts(
    name: str = "auto",
    *,
    voice: Optional[str] = None,
    url: Optional[str] = None,
    model: Optional[str] = None,
    api_key: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Optional[TTS]:
    """Create a TTS backend by name (``--tts``), with the ``--tts_*`` options.

    Args:
        name: one of :data:`TTS_CHOICES` (case-insensitive): "piper", "espeak",
            "edge", "openai", "none", or "auto": piper when its voice loads,
            otherwise espeak (offline only; logs which one and why).
        voice: the default voice (``--tts_voice``; None: the backend's own).
            piper: a voice id or a path to a piper ``.onnx`` voice (loaded next
            to the bundled one); espeak: any espeak-ng voice name ("en-us+f3");
            edge: a ShortName ("en-GB-SoniaNeural"); openai: any name the
            endpoint takes (listed next to the six standard ones).
        url: the OpenAI-compatible API base for "openai" (``--tts_url``), e.g.
            ``http://127.0.0.1:8880/v1``; speech is POSTed to ``{url}/audio/speech``.
        model: the speech model for "openai" (``--tts_model``; default "tts-1").
        api_key: the endpoint's key for "openai" (default: ``$TTS_API_KEY``).
        timeout: online backends: the longest wait to connect or for the next
            bytes, in seconds (``--tts_timeout``; default 10).

    Returns:
        a :class:`TTS` (float32 mono 16000 Hz), or None for "none".

    Raises:
        ValueError: unknown name (the message lists the choices), "openai"
            without a url, or an unknown default voice.
        ImportError: the backend's package is missing (edge-tts for "edge").
        Exception: the named engine fails to load (for "piper"/"espeak"; with
            "auto" only when espeak fails too).
    """
    key = (name or "").strip().lower()
    timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if key == "none":
        return None
    if key == "piper":
        return _backend("PiperTTS")(voice=voice)
    if key == "espeak":
        return _backend("EspeakTTS")(voice=voice) if voice else _backend("EspeakTTS")()
    if key == "edge":
        engine = _backend("EdgeTTS")(voice=voice, timeout=timeout)
        engine.refresh_voices(timeout=min(timeout, 5.0))  # the package's list when reachable
        return engine
    if key == "openai":
        if not url:
            raise ValueError("--tts openai needs --tts_url (an OpenAI-compatible API base, e.g. http://127.0.0.1:8880/v1)")
        return _backend("OpenAITTS")(url, model=model or "tts-1", voice=voice, api_key=api_key, timeout=timeout)
    if key == "auto":
        try:
            engine = _backend("PiperTTS")(voice=voice)
        except Exception as exc:  # any load failure -> fall back
            logger.warning("tts auto: piper unavailable (%s: %s); using espeak-ng", type(exc).__name__, exc)
            return _backend("EspeakTTS")(voice=voice) if voice else _backend("EspeakTTS")()
        logger.info("tts auto: using piper (voice %s)", engine.default_voice)
        return engine
    raise ValueError(f"unknown TTS engine {name!r}; choose one of: {', '.join(TTS_CHOICES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--tts_*`` options (read by :func:`options_from_args`); ``--tts`` itself
    stays with the caller (``choices=TTS_CHOICES``)."""
    g = parser.add_argument_group("text-to-speech")
    g.add_argument("--tts_url", help="--tts openai: OpenAI-compatible API base, e.g. http://127.0.0.1:8880/v1 "
                   f"(POST {{url}}/audio/speech; key: ${TTS_API_KEY_ENV})")
    g.add_argument("--tts_model", default="tts-1", help="--tts openai: speech model")
    g.add_argument("--tts_voice", help="default voice (GET /voices lists them; piper: also a path to an .onnx voice)")
    g.add_argument("--tts_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="--tts edge/openai: longest wait to connect or for the next audio (s)")


def options_from_args(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`make_tts` from parsed options:
    ``make_tts(args.tts, **options_from_args(args))``."""
    return {
        "voice": getattr(args, "tts_voice", None),
        "url": getattr(args, "tts_url", None),
        "model": getattr(args, "tts_model", None),
        "api_key": os.environ.get(TTS_API_KEY_ENV) or None,
        "timeout": getattr(args, "tts_timeout", None),
    }
