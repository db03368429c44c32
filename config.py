"""Command line, YAML config files and latency presets.

Precedence: command line > ``--config`` YAML file > latency preset > built-in
defaults. YAML keys are the option names as on the command line without dashes
(``batch_size: 8``, ``latency_mode: low``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

import chat
import tts
import workers

from basereal import SessionOptions

# Latency presets. The figures below are estimates of "pushed audio -> first speech
# frame sent" on the embedded default model (model lookahead + min_batch inference +
# prebuffer frames + up to one slot); only `low` is measured (bench/latency.py,
# docs/benchmarks.md).
LATENCY_PRESETS: dict[str, dict[str, Any]] = {
    # ~40-80 ms: smallest batches, no jitter buffer; the first CPU hiccup shows as a gap.
    # r=0: the default model's level window reaches only 5 ms past a frame (its A/V
    # calibration, docs/benchmarks.md), and measured offsets moved by ~1 ms without
    # the extra 20 ms chunk of lookahead, which costs 20 ms of latency.
    "ultra_low": dict(batch_size=2, min_batch=1, prebuffer=1, drop_threshold_ms=40, l=2, r=0),
    # ~60-120 ms: the default; one frame of jitter buffer.
    "low": dict(batch_size=4, min_batch=1, prebuffer=2, drop_threshold_ms=40, l=2, r=0),
    # ~120-200 ms: bigger batches (GPU models), 3 frames of jitter buffer.
    "balanced": dict(batch_size=8, min_batch=2, prebuffer=3, drop_threshold_ms=40, l=2, r=2),
    # ~250-400 ms: throughput first (several sessions per GPU), deep jitter buffer.
    "high_quality": dict(batch_size=16, min_batch=4, prebuffer=6, drop_threshold_ms=80, l=4, r=2),
}
PRESET_KEYS = ("batch_size", "min_batch", "prebuffer", "drop_threshold_ms", "l", "r")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Real-time talking-avatar WebRTC server")
    p.add_argument("--config", type=Path, help="YAML file with option values (command line wins)")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", "--listenport", dest="port", type=int, default=8010, help="HTTP port")
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", "default", "musetalk"],
        help="auto: MuseTalk when its weights and a CUDA device are present, else the embedded default",
    )
    p.add_argument("--models_dir", type=Path, default=Path("models"), help="MuseTalk weights folder")
    p.add_argument("--musetalk_version", default="v15", choices=["v15", "v1"], help="MuseTalk weights version")
    p.add_argument(
        "--musetalk_dtype",
        default="auto",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="MuseTalk UNet/VAE precision (auto: fp16 on CUDA, fp32 on CPU; Whisper stays fp32)",
    )
    p.add_argument(
        "--musetalk_compile",
        default="off",
        choices=["off", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile the MuseTalk UNet+VAE step at start-up, one static batch size per bucket "
        "(reduce-overhead/max-autotune: CUDA graphs); off: eager",
    )
    p.add_argument("--musetalk_unet", type=Path, metavar="DIR",
                   help="a distilled MuseTalk UNet folder (config.json + safetensors from "
                   "`python -m musetalk.distill`) used instead of the released UNet")
    p.add_argument("--musetalk_vae", type=Path, metavar="DIR",
                   help="a distilled tiny decoder folder (AutoencoderTiny from `python -m musetalk.distill`) that "
                   "decodes instead of the SD VAE's decoder (the SD VAE still encodes the avatar)")
    p.add_argument("--bbox_shift", type=int, default=0, help="MuseTalk v1.0 face-box centre shift (px)")
    p.add_argument("--extra_margin", type=int, help="MuseTalk v1.5 extra margin below the chin (px; default 10 for v1.5, 0 for v1)")
    p.add_argument(
        "--parsing",
        default="jaw",
        choices=["jaw", "raw", "landmarks"],
        help="MuseTalk blend mask: BiSeNet face parsing (jaw: v1.5, raw: v1.0) when its weights exist, else landmarks",
    )
    p.add_argument("--avatar_id", default="default", help="prepared avatar under --avatars_dir")
    p.add_argument("--avatars_dir", type=Path, default=Path("data/avatars"))
    p.add_argument("--latency_mode", default="low", choices=sorted(LATENCY_PRESETS))
    p.add_argument("--batch_size", type=int, help="largest inference batch (frames)")
    p.add_argument("--min_batch", type=int, help="frames gathered before a model call")
    p.add_argument("--prebuffer", type=int, help="frames ready before speech starts playing")
    p.add_argument("--drop_threshold_ms", type=int, help="skip video frames later than this")
    p.add_argument("-l", type=int, help="audio context before a frame, in 20 ms chunks")
    p.add_argument("-r", type=int, help="audio context after a frame (lookahead), in 20 ms chunks")
    p.add_argument("--max_session", type=int, default=8, help="concurrent sessions allowed")
    p.add_argument("--tts", default="auto", choices=tts.TTS_CHOICES,
                   help="auto: piper, else espeak; edge and openai are online (see --tts_url)")
    p.add_argument("--max_audio_seconds", type=float, default=120.0, help="pushed audio a session may queue")
    p.add_argument("--max_upload_mb", type=float, default=32.0, help="largest /humanaudio upload")
    p.add_argument("--max_text_chars", type=int, default=2000, help="longest /human text")
    p.add_argument("--connect_timeout", type=float, default=5.0, help="drop a session whose peer has not connected by then (s)")
    p.add_argument("--max_pending", type=int, default=4, help="sessions whose peer is still connecting, in all")
    p.add_argument("--max_pending_per_address", type=int, default=2, help="sessions still connecting per client address")
    p.add_argument("--peer_timeout", type=float, default=4.0,
                   help="close a connected session after this long without RTCP from its peer (s; 0: never)")
    p.add_argument("--request_timeout", type=float, default=10.0,
                   help="a client must send a request's head, and its body, within this long (s)")
    p.add_argument("--max_connections_per_address", type=int, default=64, help="open HTTP connections per client address")
    p.add_argument("--api_key", help="require 'Authorization: Bearer <key>' (default: $API_KEY; none: no access control)")
    p.add_argument("--cors_origin", action="append", default=[], metavar="ORIGIN",
                   help="an origin (scheme://host[:port]) allowed to call the API from its pages; repeatable")
    p.add_argument("--stt", default="pocketsphinx", choices=["pocketsphinx", "faster-whisper", "openai", "none"],
                   help="speech-to-text for 'mic': 'converse' (openai: any /v1/audio/transcriptions, key $STT_API_KEY)")
    p.add_argument("--stt_url", help="OpenAI-compatible API base for --stt openai")
    p.add_argument("--stt_model", help="--stt faster-whisper: model name or path; openai: model name")
    p.add_argument("--no_barge_in", action="store_true", help="in converse mode, do not stop the avatar when the user talks")
    p.add_argument("--ice_server", action="append", default=[], metavar="URL[,USER,CREDENTIAL]",
                   help="a STUN/TURN server for the server and the page (GET /config); repeatable")
    # WHEP / WHIP / Janus (issue #11; whep.py, whip.py, janus.py)
    p.add_argument("--max_viewers", type=int, default=4, help="WHEP viewers per session (each is one more encode)")
    p.add_argument("--whip_url", help="push every session to this WHIP endpoint once its peer connects (http/https)")
    p.add_argument("--whip_token", help="bearer token for --whip_url")
    p.add_argument("--video_codec", default="auto", choices=["auto", "vp8", "h264"],
                   help="video codec to send when the client offers both (auto: the cheaper to encode, VP8, "
                   "per bench/codec.py); a client that offers only one gets that one")
    p.add_argument("--janus_url", help="Janus' HTTP API (e.g. http://127.0.0.1:8088/janus) for POST /janus")
    p.add_argument("--stream_max_readers", type=int, default=4,
                   help="GET /stream/<id>.mp4 readers per session (one H.264 encode each; 429 beyond)")
    p.add_argument("--record_dir", type=Path, default=Path("data/recordings"),
                   help="where POST /record writes its MP4 files (removed when their session closes)")
    p.add_argument("--record_max_seconds", type=float, default=600.0, help="longest recording (s)")
    p.add_argument("--record_max_mb", type=float, default=200.0, help="biggest recording file (MB)")
    p.add_argument("--log_level", default="INFO")
    chat.add_arguments(p)
    tts.add_arguments(p)
    workers.add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options, apply the YAML file and the latency preset.

    Raises:
        SystemExit: bad options, an unreadable config file or unknown YAML keys.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"cannot read config {args.config}: {e}")
        if not isinstance(values, dict):
            parser.error(f"config {args.config} must be a mapping of option names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown keys in {args.config}: {', '.join(unknown)}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    preset = LATENCY_PRESETS[args.latency_mode]
    for key in PRESET_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.batch_size < 1 or args.min_batch < 1 or args.prebuffer < 1:
        parser.error("--batch_size, --min_batch and --prebuffer must be >= 1")
    args.min_batch = min(args.min_batch, args.batch_size)
    if args.extra_margin is None:
        args.extra_margin = 10 if args.musetalk_version == "v15" else 0
    return args


def session_options(args: argparse.Namespace) -> SessionOptions:
    return SessionOptions(
        batch_size=args.batch_size,
        min_batch=args.min_batch,
        prebuffer=args.prebuffer,
        drop_threshold_ms=args.drop_threshold_ms,
        max_audio_seconds=args.max_audio_seconds,
    )
