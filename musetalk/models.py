"""Load MuseTalk's released weights: UNet, SD VAE, Whisper-tiny encoder, audio PE.

Expected layout under ``models_dir`` (what ``scripts/download_weights.sh`` and
MuseTalk's own download script produce; see ``../shared/docs/musetalk-facts.md``)::

    musetalkV15/musetalk.json + unet.pth           v1.5 UNet (diffusers config + state dict)
    musetalk/musetalk.json + pytorch_model.bin     v1.0 UNet (same format)
    sd-vae/ (or sd-vae-ft-mse/)                    stabilityai/sd-vae-ft-mse AutoencoderKL:
        config.json + diffusion_pytorch_model.bin (or .safetensors)
    whisper/tiny.pt                                openai-whisper checkpoint, or the
    whisper/config.json + pytorch_model.bin        transformers openai/whisper-tiny folder
        (or model.safetensors)
    face-parse-bisent/79999_iter.pth               optional BiSeNet face parsing
    face-parse-bisent/resnet18-5c106cde.pth        optional BiSeNet backbone init

A missing, empty, truncated or otherwise unreadable file raises
:class:`MissingWeightsError`, whose one message lists every expected path, its
state, and how to get the files. Every checkpoint is read with
``torch.load(weights_only=True)`` (plain tensors only: no code runs on load).

The transformers Whisper folder is read without transformers: its encoder keys
are renamed onto openai-whisper's ``AudioEncoder`` (same architecture).
"""

from __future__ import annotations

import json
import logging
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "MissingWeightsError",
    "MuseTalkPaths",
    "MuseTalkModels",
    "AudioPositionalEncoding",
    "find_weights",
    "load_unet",
    "load_vae",
    "load_whisper_encoder",
    "load_models",
    "load_unet_folder",
    "STUDENT_INFO_NAME",
    "load_vae_folder",
    "DecoderSwapVAE",
    "normalize_version",
    "positional_encoding",
]

# Accepted spellings of the two released versions -> canonical name.
VERSIONS = {"v15": "v15", "v1.5": "v15", "v1": "v1", "v10": "v1", "v1.0": "v1"}
_VERSION_LABEL = {"v15": "v1.5", "v1": "v1.0"}

# Released file names (MuseTalk README / download_weights.sh, diffusers, openai-whisper).
UNET_CONFIG_NAME = "musetalk.json"
UNET_LAYOUT = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}
VAE_DIRS = ("sd-vae", "sd-vae-ft-mse")
# diffusers' from_pretrained prefers .safetensors when both are present; so do we.
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_DIR = "whisper"
WHISPER_OPENAI_NAME = "tiny.pt"
WHISPER_HF_WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")
FACE_PARSE_DIR = "face-parse-bisent"
FACE_PARSE_NAME = "79999_iter.pth"
FACE_PARSE_RESNET_NAME = "resnet18-5c106cde.pth"

# MuseTalk's UNet: 4 VAE latents x (masked, reference) in, 4 latents out (facts doc).
UNET_IN_CHANNELS = 8
UNET_OUT_CHANNELS = 4

# Audio positional encoding (facts doc): Whisper-tiny width, sinusoid base 10000.
AUDIO_PE_DIM = 384
AUDIO_PE_MAX_LEN = 5000
PE_BASE = 10000.0

# Distilled models (``python -m musetalk.distill``): diffusers ``save_pretrained`` folders.
FOLDER_CONFIG_NAME = "config.json"
FOLDER_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
STUDENT_INFO_NAME = "musetalk_student.json"  # in a distilled UNet folder: {"teacher_version": "v15"|"v1"}
DISTILL_HINT = "write it with `python -m musetalk.distill` (README, 'A distilled MuseTalk')"

DOWNLOAD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_weights.sh"

_GIT_LFS_POINTER = b"version https://git-lfs"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # legacy torch.save format: a pickle (protocol 2+) stream
_MAX_EXAMPLES = 3  # keys quoted per kind in a state-dict mismatch message

# transformers Whisper encoder names -> openai-whisper AudioEncoder names (after
# stripping "model.encoder." / "encoder."): whole prefixes, then inner fragments.
_HF_WHISPER_PREFIXES = (
    ("embed_positions.weight", "positional_embedding"),
    ("layer_norm.", "ln_post."),
    ("layers.", "blocks."),
)
_HF_WHISPER_PARTS = (
    (".self_attn_layer_norm.", ".attn_ln."),
    (".self_attn.q_proj.", ".attn.query."),
    (".self_attn.k_proj.", ".attn.key."),
    (".self_attn.v_proj.", ".attn.value."),
    (".self_attn.out_proj.", ".attn.out."),
    (".final_layer_norm.", ".mlp_ln."),
    (".fc1.", ".mlp.0."),
    (".fc2.", ".mlp.2."),
)


class MissingWeightsError(FileNotFoundError):
    """MuseTalk weights are missing or unreadable.

    The message names every expected path (absolute) with its state ("ok",
    "missing", or "bad: <reason>") and how to get the files.

    Attributes:
        missing: absolute paths that are absent for a requirement that no
            alternative satisfies.
        problems: absolute path -> reason, for files that exist but cannot be used.
    """

    def __init__(self, message: str, missing: list[Path], problems: dict[Path, str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.problems = problems


@dataclass(frozen=True)
class MuseTalkPaths:
    """Resolved weight files of one MuseTalk version (all paths absolute).

    Attributes:
        models_dir: the folder everything was found in.
        version: "v15" or "v1".
        unet_config: ``musetalk.json`` (a diffusers UNet2DConditionModel config);
            None when resolved without the UNet (``find_weights(..., unet=False)``).
        unet_weights: ``unet.pth`` (v1.5) or ``pytorch_model.bin`` (v1.0); None likewise.
        vae_dir: the AutoencoderKL folder (``sd-vae`` or ``sd-vae-ft-mse``).
        vae_weights: its ``diffusion_pytorch_model.safetensors`` or ``.bin``.
        whisper: ``tiny.pt``, or a transformers ``pytorch_model.bin`` / ``model.safetensors``.
        whisper_config: the transformers ``config.json``; None for ``tiny.pt``.
        face_parse: BiSeNet ``79999_iter.pth``, or None when absent.
        face_parse_resnet: ``resnet18-5c106cde.pth``, or None when absent.
    """

    models_dir: Path
    version: str
    unet_config: Path | None
    unet_weights: Path | None
    vae_dir: Path
    vae_weights: Path
    whisper: Path
    whisper_config: Path | None
    face_parse: Path | None
    face_parse_resnet: Path | None


@dataclass(frozen=True)
class _Requirement:
    """One component: alternative options, each a list of slots of alternative files."""

    key: str
    label: str
    source: str
    options: tuple[tuple[tuple[Path, ...], ...], ...]
    required: bool = True


def normalize_version(version: str) -> str:
    """Canonical version name: "v15" for "v15"/"v1.5", "v1" for "v1"/"v10"/"v1.0".

    Raises:
        ValueError: any other spelling.
    """
    try:
        return VERSIONS[str(version).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown MuseTalk version {version!r}; use one of {sorted(VERSIONS)}") from None


def _layout(models_dir: Path, version: str, unet: bool = True) -> list[_Requirement]:
    """The expected files of ``version`` under ``models_dir``, in message order
    (without the UNet when ``unet`` is False)."""
    unet_dir, unet_name = UNET_LAYOUT[version]
    whisper = models_dir / WHISPER_DIR
    face = models_dir / FACE_PARSE_DIR
    layout = [
        _Requirement(
            "unet",
            f"UNet {_VERSION_LABEL[version]}",
            f"huggingface.co/TMElyralab/MuseTalk ({unet_dir}/{UNET_CONFIG_NAME}, {unet_dir}/{unet_name})",
            (((models_dir / unet_dir / UNET_CONFIG_NAME,), (models_dir / unet_dir / unet_name,)),),
        ),
        _Requirement(
            "vae",
            "VAE (one folder)",
            "huggingface.co/stabilityai/sd-vae-ft-mse (config.json, diffusion_pytorch_model.bin)",
            tuple(
                ((models_dir / d / "config.json",), tuple(models_dir / d / n for n in VAE_WEIGHT_NAMES))
                for d in VAE_DIRS
            ),
        ),
        _Requirement(
            "whisper",
            "Whisper-tiny",
            "openai-whisper's tiny.pt (URL in whisper._MODELS['tiny']), or "
            "huggingface.co/openai/whisper-tiny (config.json, pytorch_model.bin)",
            (
                ((whisper / WHISPER_OPENAI_NAME,),),
                ((whisper / "config.json",), tuple(whisper / n for n in WHISPER_HF_WEIGHT_NAMES)),
            ),
        ),
        _Requirement(
            "face_parse",
            "face parsing (optional: blend masks then come from landmarks)",
            "huggingface.co/ManyOtherFunctions/face-parse-bisent (79999_iter.pth)",
            (((face / FACE_PARSE_NAME,),),),
            required=False,
        ),
        _Requirement(
            "face_parse_resnet",
            "face-parsing backbone (optional)",
            "download.pytorch.org/models/resnet18-5c106cde.pth",
            (((face / FACE_PARSE_RESNET_NAME,),),),
            required=False,
        ),
    ]
    return [req for req in layout if unet or req.key != "unet"]


def _file_problem(path: Path) -> str | None:
    """None if ``path`` looks like a usable file of its kind, else what is wrong.

    Cheap checks only (a few bytes and the zip directory): "missing", empty,
    git-lfs pointer, invalid JSON, truncated zip / safetensors, unknown format.
    A file that passes can still fail to load; the loaders report that too.
    """
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_GIT_LFS_POINTER):
        return "a git-lfs pointer, not the file itself (run `git lfs pull` or download it)"
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"invalid JSON ({exc})"
        return None if isinstance(value, dict) else "not a JSON object"
    if path.suffix == ".safetensors":
        # safetensors: u64 little-endian header length, JSON header, then the data.
        if size < 8 or 8 + struct.unpack("<Q", head[:8])[0] > size:
            return "truncated safetensors file"
        return None
    if head.startswith(_ZIP_MAGIC):
        return None if zipfile.is_zipfile(path) else "truncated or corrupt (incomplete zip archive)"
    if head.startswith(_PICKLE_MAGIC):
        return None
    return "not a PyTorch checkpoint"


def _check(models_dir: Path, version: str, overrides: dict[Path, str] | None = None, unet: bool = True):
    """Resolve the layout. Returns (chosen files per requirement key, error or None).

    ``overrides`` marks files that exist but failed to load (path -> reason);
    ``unet`` False leaves the UNet out (a distilled one is loaded instead).
    """
    overrides = overrides or {}
    states: dict[Path, str | None] = {}

    def state(path: Path) -> str | None:
        if path not in states:
            states[path] = overrides.get(path) or _file_problem(path)
        return states[path]

    chosen: dict[str, list[Path] | None] = {}
    lines: list[str] = []
    missing: list[Path] = []
    problems: dict[Path, str] = {}
    failed = False
    for req in _layout(models_dir, version, unet):
        pick = None
        for option in req.options:
            files = [next((p for p in slot if state(p) is None), None) for slot in option]
            if all(files):
                pick = files
                break
        every = [p for option in req.options for slot in option for p in slot]
        bad = {p: state(p) for p in every if state(p) != "missing" and state(p) is not None}
        # Broken: nothing usable for a required part; a present but unreadable optional
        # file; or a file that failed to load (even if an alternative looks fine).
        broken = (pick is None and (req.required or bool(bad))) or any(p in overrides for p in every)
        if pick is not None and not broken:
            status = "ok"
        elif bad:
            status = "BAD"
        else:
            status = "MISSING" if req.required else "absent"
        chosen[req.key] = pick
        if broken:
            failed = True
            problems.update(bad)
            missing += [p for p in every if state(p) == "missing"]
        lines.append(f"  [{status}] {req.label} <- {req.source}")
        for n, option in enumerate(req.options):
            if len(req.options) > 1:
                lines.append(f"      {'either' if n == 0 else 'or'}:")
            for slot in option:
                for k, p in enumerate(slot):
                    s = state(p)
                    mark = "ok" if s is None else ("missing" if s == "missing" else f"bad: {s}")
                    lines.append(f"        {'or ' if k else '   '}{p}  [{mark}]")
    if not failed:
        return chosen, None
    label = _VERSION_LABEL[version]
    message = "\n".join(
        [
            f"MuseTalk {label} weights are missing or unreadable under {models_dir}:",
            *lines,
            f"Get them with `bash {DOWNLOAD_SCRIPT} {models_dir}"
            + (" --v1" if version == "v1" else "")
            + "` (needs internet), or place the files at the paths above.",
        ]
    )
    return chosen, MissingWeightsError(message, missing, problems)


def find_weights(models_dir: Path | str, version: str = "v15", unet: bool = True) -> MuseTalkPaths:
    """Resolve the released weight files of ``version`` under ``models_dir``.

    Args:
        models_dir: the ``models/`` folder.
        version: "v15"/"v1.5" or "v1"/"v10"/"v1.0".
        unet: False when a distilled UNet replaces the released one
            (``--musetalk_unet``): its files are then neither required nor checked.
    Returns:
        MuseTalkPaths with absolute paths; optional face-parsing files None if
        absent; ``unet_config``/``unet_weights`` None when ``unet`` is False.
    Raises:
        ValueError: unknown version.
        MissingWeightsError: a required file is missing, or any expected file is
            empty, a git-lfs pointer, truncated or not of its format. The message
            lists every expected path and how to get the files.
    """
    version = normalize_version(version)
    models_dir = Path(models_dir).expanduser().resolve()
    chosen, error = _check(models_dir, version, unet=unet)
    if error is not None:
        raise error
    unet_files, vae, whisper = chosen.get("unet") or (None, None), chosen["vae"], chosen["whisper"]
    return MuseTalkPaths(
        models_dir=models_dir,
        version=version,
        unet_config=unet_files[0],
        unet_weights=unet_files[1],
        vae_dir=vae[0].parent,
        vae_weights=vae[1],
        whisper=whisper[-1],
        whisper_config=whisper[0] if len(whisper) == 2 else None,
        face_parse=(chosen["face_parse"] or [None])[0],
        face_parse_resnet=(chosen["face_parse_resnet"] or [None])[0],
    )


def _weights_error(paths: MuseTalkPaths, path: Path, reason: str) -> MissingWeightsError:
    """The full-layout error with ``path`` marked bad for ``reason``."""
    _, error = _check(paths.models_dir, paths.version, {path: reason}, unet=paths.unet_weights is not None)
    return error


def _torch_load(path: Path, paths: MuseTalkPaths):
    """``torch.load(path, weights_only=True)`` on the CPU, as MissingWeightsError on failure."""
    try:
        # mmap (zip format only) avoids holding a second copy of a 3.4 GB state dict.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch/pickle raise many types (RuntimeError, UnpicklingError, EOFError...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _weights_error(paths, path, f"torch.load failed: {type(exc).__name__}: {reason}"[:300]) from exc


def _state_dict_mismatch(module: nn.Module, state: dict) -> str | None:
    """None if ``state`` has exactly ``module``'s keys and shapes, else a short description."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a plain state dict (name -> tensor)"
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    )
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    parts = [f"{len(items)} {kind} (e.g. {', '.join(items[:_MAX_EXAMPLES])})" for kind, items in kinds if items]
    return "state dict does not match the model: " + "; ".join(parts) if parts else None


def _freeze(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move to device/dtype, eval mode, no gradients.

    Uses ``nn.Module.to``: diffusers 0.42's ``ModelMixin.to`` warns about
    "modules that should be kept in float32: []" on every dtype cast.
    """
    module = nn.Module.to(module, device=device, dtype=dtype).eval()
    module.requires_grad_(False)
    return module


def load_unet(paths: MuseTalkPaths, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """MuseTalk's UNet: ``musetalk.json`` + the state dict, loaded strictly.

    The model is built on the meta device (no random init) and takes the file's
    tensors directly. Extra config keys are ignored by diffusers (with a warning).

    Args:
        paths: from :func:`find_weights`.
        device, dtype: where and in what precision the model runs.
    Returns:
        ``diffusers.UNet2DConditionModel`` in eval mode, requires_grad False:
        (B, 8, 32, 32) latents, timestep 0, (B, 50, 384) audio -> ``.sample`` (B, 4, 32, 32).
    Raises:
        MissingWeightsError: the config is not a MuseTalk UNet (8 -> 4 channels), the
            weights cannot be read, or their keys/shapes do not match the config
            (the reason names a few of them).
    """
    from diffusers import UNet2DConditionModel

    if paths.unet_config is None or paths.unet_weights is None:
        raise ValueError("these paths were resolved without the UNet (find_weights(..., unet=False))")
    config = json.loads(paths.unet_config.read_text())
    kind = config.get("_class_name", "UNet2DConditionModel")
    channels = (config.get("in_channels"), config.get("out_channels"))
    if kind != "UNet2DConditionModel" or channels != (UNET_IN_CHANNELS, UNET_OUT_CHANNELS):
        raise _weights_error(
            paths,
            paths.unet_config,
            f"not a MuseTalk UNet config ({kind}, in/out channels {channels}; "
            f"expected UNet2DConditionModel, ({UNET_IN_CHANNELS}, {UNET_OUT_CHANNELS}))",
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = _torch_load(paths.unet_weights, paths)
    problem = _state_dict_mismatch(unet, state)
    if problem:
        raise _weights_error(paths, paths.unet_weights, f"{problem} (from {paths.unet_config.name})")
    unet.load_state_dict(state, strict=True, assign=True)
    return _freeze(unet, device, dtype)


def load_vae(paths: MuseTalkPaths, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The SD VAE via ``AutoencoderKL.from_pretrained(paths.vae_dir)``.

    diffusers (0.42, ``ModelMixin._fix_state_dict_keys_on_load``) renames the old
    mid-block attention keys of sd-vae-ft-mse's ``.bin`` (``query``/``key``/
    ``value``/``proj_attn`` -> ``to_q``/``to_k``/``to_v``/``to_out.0``). Unlike
    ``from_pretrained``'s default, missing or unexpected keys are an error here.

    Returns:
        ``diffusers.AutoencoderKL`` in eval mode, requires_grad False: decode
        (B, 4, 32, 32) -> ``.sample`` (B, 3, 256, 256) in about [-1, 1].
    Raises:
        MissingWeightsError: the folder cannot be loaded or its keys do not match.
    """
    from diffusers import AutoencoderKL

    try:
        vae, info = AutoencoderKL.from_pretrained(
            paths.vae_dir,
            torch_dtype=dtype,
            use_safetensors=paths.vae_weights.suffix == ".safetensors",
            low_cpu_mem_usage=False,  # needs accelerate otherwise; the VAE is small
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise _weights_error(paths, paths.vae_weights, f"from_pretrained failed: {exc}"[:300]) from exc
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:_MAX_EXAMPLES]))}" for k, v in wrong.items())
        raise _weights_error(paths, paths.vae_weights, f"state dict does not match config.json ({detail})")
    return _freeze(vae, device, dtype)


def _whisper_dims_and_state(paths: MuseTalkPaths):
    """(ModelDimensions-like dict of the encoder, encoder state dict with openai names)."""
    if paths.whisper_config is None:
        checkpoint = _torch_load(paths.whisper, paths)
        if not (
            isinstance(checkpoint, dict)
            and isinstance(checkpoint.get("dims"), dict)
            and isinstance(checkpoint.get("model_state_dict"), dict)
        ):
            raise _weights_error(paths, paths.whisper, "not an openai-whisper checkpoint (dims + model_state_dict)")
        full = checkpoint["model_state_dict"]
        state = {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.")}
        return checkpoint["dims"], state
    config = json.loads(paths.whisper_config.read_text())
    try:
        dims = {
            "n_mels": config["num_mel_bins"],
            "n_audio_ctx": config["max_source_positions"],
            "n_audio_state": config["d_model"],
            "n_audio_head": config["encoder_attention_heads"],
            "n_audio_layer": config["encoder_layers"],
        }
    except KeyError as exc:
        raise _weights_error(paths, paths.whisper_config, f"not a Whisper config (no {exc})") from None
    if paths.whisper.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw = load_file(paths.whisper)
        except Exception as exc:  # safetensors raises its own error types
            raise _weights_error(paths, paths.whisper, f"safetensors load failed: {exc}"[:300]) from exc
    else:
        raw = _torch_load(paths.whisper, paths)
    if not isinstance(raw, dict):
        raise _weights_error(paths, paths.whisper, "not a state dict")
    state = {}
    for key, tensor in raw.items():
        key = key.removeprefix("model.")
        if not key.startswith("encoder."):
            continue
        key = key[len("encoder.") :]
        for old, new in _HF_WHISPER_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
        for old, new in _HF_WHISPER_PARTS:
            key = key.replace(old, new)
        state[key] = tensor
    return dims, state


def load_whisper_encoder(
    paths: MuseTalkPaths, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """The Whisper-tiny audio encoder only (openai-whisper's ``AudioEncoder``).

    From ``tiny.pt`` (``{"dims", "model_state_dict"}``) or a transformers
    ``openai/whisper-tiny`` folder (keys renamed to openai-whisper's); the
    ``encoder.*`` tensors are loaded strictly, the text decoder is not built.

    Returns:
        ``whisper.model.AudioEncoder`` in eval mode, requires_grad False:
        log-mel (B, 80, 3000) -> (B, 1500, 384) for tiny (last block + ``ln_post``).
    Raises:
        MissingWeightsError: unreadable file, wrong dims, or key/shape mismatch.
    """
    from whisper.model import AudioEncoder, ModelDimensions

    dims, state = _whisper_dims_and_state(paths)
    source = paths.whisper_config if paths.whisper_config is not None else paths.whisper
    try:
        if paths.whisper_config is None:
            dims = vars(ModelDimensions(**dims))
        encoder = AudioEncoder(
            dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"]
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _weights_error(paths, source, f"bad Whisper dimensions {dims}: {exc}"[:300]) from exc
    problem = _state_dict_mismatch(encoder, state)
    if problem:
        raise _weights_error(paths, paths.whisper, problem)
    encoder.load_state_dict(state, strict=True)
    return _freeze(encoder, device, dtype)


def positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """The standard sinusoidal positional encoding (Vaswani et al. 2017).

    ``pe[p, 2i] = sin(p / 10000^(2i / d_model))``, ``pe[p, 2i+1] = cos(...)``
    (MuseTalk applies it to its audio tokens; facts doc). Computed in float64.

    Returns:
        float32 (length, d_model).
    Raises:
        ValueError: negative length or d_model < 1.
    """
    if length < 0 or d_model < 1:
        raise ValueError(f"need length >= 0 and d_model >= 1, got {length}, {d_model}")
    position = torch.arange(length, dtype=torch.float64)[:, None]
    angle = position / PE_BASE ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.empty(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.float()


class AudioPositionalEncoding(nn.Module):
    """Adds :func:`positional_encoding` (no scaling) to (B, T, d_model) audio tokens.

    The table is a non-persistent buffer: it follows ``.to(device, dtype)`` and
    is not part of any state dict.

    Args:
        d_model: token width (384 = Whisper-tiny; the UNet's cross_attention_dim).
        max_len: longest T accepted.
    """

    def __init__(self, d_model: int = AUDIO_PE_DIM, max_len: int = AUDIO_PE_MAX_LEN) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("pe", positional_encoding(max_len, d_model)[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model), same dtype.

        Raises:
            ValueError: wrong rank or width, or T > max_len.
        """
        if x.ndim != 3 or x.shape[2] != self.d_model or x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"expected (B, T <= {self.pe.shape[1]}, {self.d_model}), got {tuple(x.shape)}")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


def _folder_files(folder: Path | str, what: str) -> tuple[Path, Path, dict]:
    """(config.json, weights file, config) of a ``save_pretrained`` folder.

    Raises:
        MissingWeightsError: the folder, its config or its weights are missing or
            unreadable (the message names the expected files).
    """
    folder = Path(folder).expanduser().resolve()
    config_path = folder / FOLDER_CONFIG_NAME
    candidates = [folder / name for name in FOLDER_WEIGHT_NAMES]
    states = {p: _file_problem(p) for p in [config_path, *candidates]}
    weights = next((p for p in candidates if states[p] is None), None)
    if states[config_path] is None and weights is not None:
        return config_path, weights, json.loads(config_path.read_text())
    lines = [f"{what} folder {folder} is incomplete:"]
    lines += [f"  {p}  [{'ok' if s is None else s}]" for p, s in states.items()]
    lines.append(f"  ({FOLDER_CONFIG_NAME} and one of the weight files are needed; {DISTILL_HINT})")
    missing = [p for p, s in states.items() if s == "missing"]
    problems = {p: s for p, s in states.items() if s not in (None, "missing")}
    raise MissingWeightsError("\n".join(lines), missing, problems)


def _folder_error(path: Path, reason: str) -> MissingWeightsError:
    return MissingWeightsError(f"{path}: {reason} ({DISTILL_HINT})", [], {path: reason})


def _load_state(path: Path) -> dict:
    """A ``.safetensors`` or ``torch.save``'d state dict, as MissingWeightsError on failure."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / torch / pickle raise many types
        raise _folder_error(path, f"cannot read weights: {type(exc).__name__}: {exc}"[:300]) from exc


def load_unet_folder(folder: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     version: str | None = None):
    """A MuseTalk-compatible UNet from a diffusers folder (``--musetalk_unet``).

    The folder is what ``UNet2DConditionModel.save_pretrained`` writes (the
    distilled student of ``python -m musetalk.distill``): ``config.json`` +
    ``diffusion_pytorch_model.safetensors`` (or ``.bin``), and from the distiller
    :data:`STUDENT_INFO_NAME` naming the teacher's version: with ``version``
    given ("v15"/"v1", the server's ``--musetalk_version``) the two must agree,
    since the student learnt that version's crops. Like :func:`load_unet`,
    the model is built on the meta device and the weights are loaded strictly.

    Returns:
        ``UNet2DConditionModel`` in eval mode, requires_grad False, on ``device``
        in ``dtype``: (B, 8, 32, 32), t = 0, (B, 50, 384) -> ``.sample`` (B, 4, 32, 32).
    Raises:
        MissingWeightsError: missing/unreadable files, a config that is not an
            8 -> 4 channel UNet2DConditionModel, weights that do not match it, or
            a student of another MuseTalk version than ``version``.
    """
    from diffusers import UNet2DConditionModel

    config_path, weights, config = _folder_files(folder, "UNet")
    info_path = config_path.parent / STUDENT_INFO_NAME
    if version is not None and info_path.is_file():
        try:
            teacher_version = json.loads(info_path.read_text()).get("teacher_version")
        except (OSError, ValueError, AttributeError) as exc:
            raise _folder_error(info_path, f"unreadable: {exc}"[:300]) from exc
        if teacher_version is not None and normalize_version(teacher_version) != normalize_version(version):
            raise _folder_error(info_path, f"this UNet was distilled from MuseTalk {teacher_version}, but "
                                           f"{normalize_version(version)} is in use (--musetalk_version)")
    kind = config.get("_class_name", "UNet2DConditionModel")
    channels = (config.get("in_channels"), config.get("out_channels"))
    if kind != "UNet2DConditionModel" or channels != (UNET_IN_CHANNELS, UNET_OUT_CHANNELS):
        raise _folder_error(config_path, f"not a MuseTalk UNet config ({kind}, in/out channels {channels}; "
                                         f"expected UNet2DConditionModel, ({UNET_IN_CHANNELS}, {UNET_OUT_CHANNELS}))")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = _load_state(weights)
    problem = _state_dict_mismatch(unet, state)
    if problem:
        raise _folder_error(weights, f"{problem} (from {config_path.name})")
    unet.load_state_dict(state, strict=True, assign=True)
    return _freeze(unet, device, dtype)


class DecoderSwapVAE(nn.Module):
    """The SD VAE's encoder with another decoder (a distilled ``AutoencoderTiny``).

    MuseTalk's UNet works on SD latents, so avatar preparation still encodes with
    the SD VAE (``encode``, ``encoder``, ``quant_conv`` and ``config`` are its own:
    ``musetalk.prepare.vae_identity`` and the cached latents do not change), and
    only decoding goes through the tiny decoder. ``decode`` takes UNSCALED latents
    like ``AutoencoderKL.decode`` (the engine divides by VAE_SCALE) and hands the
    tiny decoder scaled ones (x VAE_SCALE: TAESD's convention).

    Args:
        vae: the SD ``AutoencoderKL`` (sd-vae-ft-mse).
        decoder: a diffusers ``AutoencoderTiny`` (only its decoder is used).
    """

    def __init__(self, vae: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.tiny = decoder

    @property
    def config(self):
        return self.vae.config

    @property
    def encoder(self):
        return self.vae.encoder

    @property
    def quant_conv(self):
        return self.vae.quant_conv

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """The SD VAE's ``encode`` ((B, 3, 256, 256) in [-1, 1] -> latent distribution)."""
        return self.vae.encode(x, return_dict=return_dict)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """(B, 4, h, w) unscaled latents -> ``.sample`` (B, 3, 8h, 8w) in about [-1, 1]."""
        from musetalk.inference import VAE_SCALE

        return self.tiny.decode(z * VAE_SCALE, return_dict=return_dict)


def load_vae_folder(folder: Path | str, vae: nn.Module, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """The VAE of ``--musetalk_vae``: a diffusers folder (``config.json`` + weights).

    ``AutoencoderTiny`` (the distilled decoder of ``python -m musetalk.distill``, or
    TAESD): returned as :class:`DecoderSwapVAE` around ``vae`` (the SD VAE keeps
    encoding). ``AutoencoderKL`` (another full VAE): returned as is; it encodes and
    decodes, and the avatar's cache key changes with its encoder.

    Raises:
        MissingWeightsError: missing/unreadable files, another class, or weights
            that do not match the config.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    config_path, weights, config = _folder_files(folder, "VAE")
    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    cls = classes.get(config.get("_class_name"))
    if cls is None:
        raise _folder_error(config_path, f"_class_name {config.get('_class_name')!r} is not one of {sorted(classes)}")
    try:
        model, info = cls.from_pretrained(config_path.parent, torch_dtype=dtype, low_cpu_mem_usage=False,
                                          use_safetensors=weights.suffix == ".safetensors", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise _folder_error(weights, f"from_pretrained failed: {exc}"[:300]) from exc
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:_MAX_EXAMPLES]))}" for k, v in wrong.items())
        raise _folder_error(weights, f"state dict does not match config.json ({detail})")
    model = _freeze(model, device, dtype)
    return DecoderSwapVAE(vae, model) if cls is AutoencoderTiny else model


@dataclass
class MuseTalkModels:
    """Everything MuseTalk inference needs, on one device.

    Attributes:
        unet: diffusers UNet2DConditionModel (see :func:`load_unet`), in ``dtype``.
        vae: diffusers AutoencoderKL (see :func:`load_vae`), in ``dtype``.
        whisper: whisper.model.AudioEncoder (see :func:`load_whisper_encoder`),
            always float32: openai-whisper's LayerNorm computes in float32 with its
            own weights, so a half-precision encoder fails, and Whisper-tiny's ~8M
            parameters on a short streaming span cost little in float32.
        pe: AudioPositionalEncoding of the UNet's cross-attention width.
        version: "v15" or "v1".
        device: torch.device of all modules.
        dtype: torch.float16 on CUDA, float32 on CPU by default.
        paths: the files they came from (face-parsing paths included).
    """

    unet: nn.Module
    vae: nn.Module
    whisper: nn.Module
    pe: AudioPositionalEncoding
    version: str
    device: torch.device
    dtype: torch.dtype
    paths: MuseTalkPaths


def _count(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def load_models(
    models_dir: Path | str,
    version: str = "v15",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    unet_dir: Path | str | None = None,
    vae_dir: Path | str | None = None,
) -> MuseTalkModels:
    """Find and load all MuseTalk weights of ``version`` under ``models_dir``.

    Args:
        models_dir: the ``models/`` folder (see the module docstring for its layout).
        version: "v15"/"v1.5" or "v1"/"v10"/"v1.0".
        device: default "cuda" when available, else "cpu".
        dtype: of the UNet, the VAE and the positional encoding; default float16
            on CUDA, float32 otherwise. The Whisper encoder is float32 whatever it is
            (see :class:`MuseTalkModels`).
        unet_dir: a distilled (student) UNet folder to use instead of the released
            UNet (:func:`load_unet_folder`; ``--musetalk_unet``); the released
            UNet's files are then not needed.
        vae_dir: a VAE folder whose decoder replaces the SD VAE's
            (:func:`load_vae_folder`; ``--musetalk_vae``).
    Raises:
        ValueError: unknown version.
        MissingWeightsError: missing or unreadable files, or a Whisper width that
            differs from the UNet's cross-attention width.
    """
    paths = find_weights(models_dir, version, unet=unet_dir is None)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    unet = (load_unet(paths, device, dtype) if unet_dir is None
            else load_unet_folder(unet_dir, device, dtype, paths.version))
    vae = load_vae(paths, device, dtype)
    if vae_dir is not None:
        vae = load_vae_folder(vae_dir, vae, device, dtype)
    whisper = load_whisper_encoder(paths, device, torch.float32)
    width = unet.config.cross_attention_dim
    if whisper.ln_post.normalized_shape[0] != width:
        raise _weights_error(
            paths,
            paths.whisper,
            f"Whisper width {whisper.ln_post.normalized_shape[0]} != the UNet's cross_attention_dim {width}",
        )
    pe = AudioPositionalEncoding(width).to(device=device, dtype=dtype)
    log.info(
        "MuseTalk %s from %s on %s (%s) in %.1f s: UNet %s params, VAE %s (%s), Whisper encoder %s (%s)%s",
        _VERSION_LABEL[paths.version],
        paths.models_dir,
        device,
        dtype,
        time.perf_counter() - start,
        f"{_count(unet)}{f' (student from {unet_dir})' if unet_dir is not None else ''}",
        _count(vae),
        paths.vae_dir.name + (f" + decoder from {vae_dir}" if vae_dir is not None else ""),
        _count(whisper),
        paths.whisper.name,
        ", face parsing available" if paths.face_parse else "",
    )
    return MuseTalkModels(unet, vae, whisper, pe, paths.version, device, dtype, paths)
