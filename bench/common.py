"""Helpers shared by the benchmark scripts: speech input and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"


def load_speech(path: Path | None = None) -> np.ndarray:
    """float32 16 kHz mono speech: a ``.npy`` of it, any audio file, or by default
    ../shared/media/sun.wav when present, else espeak reading a pangram."""
    if path is None and not (MEDIA / "sun.wav").exists():
        from tts import make_tts

        return make_tts("espeak").synthesize("The quick brown fox jumps over the lazy dog. " * 6)
    path = path or MEDIA / "sun.wav"
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32).reshape(-1)
    from audio import decode_audio

    return decode_audio(path.read_bytes(), max_seconds=600)


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text)
