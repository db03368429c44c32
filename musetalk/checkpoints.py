"""Random-weight MuseTalk checkpoints written in the exact released file formats.

For tests (tiny widths, a forward pass takes milliseconds) and GPU benchmarks
(the released sizes, so the loaders, FLOPs and memory are the real ones while no
weights can be downloaded). The layouts and formats follow
``../shared/docs/musetalk-facts.md``:

- ``musetalkV15/musetalk.json`` + ``unet.pth`` (v1.5) or ``musetalk/musetalk.json``
  + ``pytorch_model.bin`` (v1.0): a diffusers ``UNet2DConditionModel`` config in the
  SD-1.x era key set (the released file says ``_diffusers_version`` 0.6.0.dev0) and
  a plain ``torch.save``'d state dict with diffusers key names, no prefix.
- ``sd-vae/config.json`` + ``diffusion_pytorch_model.bin``: the sd-vae-ft-mse key
  set, with the mid-block attention weights under the OLD names
  (``query``/``key``/``value``/``proj_attn``) as in the real ``.bin``.
- ``whisper/tiny.pt``: openai-whisper's checkpoint dict
  ``{"dims": {...ModelDimensions...}, "model_state_dict": {...}}`` holding the
  whole Whisper model in float16, like the released file.
- ``whisper/config.json`` + ``pytorch_model.bin``: the transformers
  ``openai/whisper-tiny`` layout (``model.encoder.*`` / ``model.decoder.*`` keys, fp32).

``size="tiny"``: MuseTalk's architecture (8 input / 4 output channels,
cross-attention on the audio width, VAE factor 8) with tiny widths.
``size="full"``: the released configs (:data:`RELEASED_UNET_CONFIG`, checked
against the public ``musetalk.json``; :data:`RELEASED_VAE_CONFIG`; Whisper-tiny's
dimensions), about 3.4 GB of UNet weights in fp32.
Every writer seeds its own RNG (without touching the global one), so files and
outputs are reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 1234
SIZES = ("tiny", "full")

# The released musetalk.json (v1.0 and v1.5 ship the same file), key for key as in
# the public MuseTalk repository (train_codes/musetalk.json): ~850M parameters.
RELEASED_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json (the SD 1.x AutoencoderKL, ~84M parameters).
RELEASED_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai-whisper's ModelDimensions of "tiny" (whisper/__init__.py _MODELS, tiny.pt).
WHISPER_TINY_DIMS = {
    "n_mels": 80, "n_vocab": 51865, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
    "n_audio_layer": 4, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4,
}

# diffusers renamed the VAE mid-block attention (AttentionBlock -> Attention);
# sd-vae-ft-mse's diffusion_pytorch_model.bin still has the old names.
_OLD_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

# openai-whisper -> transformers key fragments (transformers' Whisper naming).
_OPENAI_TO_HF_WHISPER = [
    ("encoder.ln_post.", "encoder.layer_norm."),
    ("decoder.ln.", "decoder.layer_norm."),
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("decoder.token_embedding.", "decoder.embed_tokens."),
    (".blocks.", ".layers."),
    (".cross_attn_ln.", ".encoder_attn_layer_norm."),
    (".cross_attn.query.", ".encoder_attn.q_proj."),
    (".cross_attn.key.", ".encoder_attn.k_proj."),
    (".cross_attn.value.", ".encoder_attn.v_proj."),
    (".cross_attn.out.", ".encoder_attn.out_proj."),
    (".attn_ln.", ".self_attn_layer_norm."),
    (".attn.query.", ".self_attn.q_proj."),
    (".attn.key.", ".self_attn.k_proj."),
    (".attn.value.", ".self_attn.v_proj."),
    (".attn.out.", ".self_attn.out_proj."),
    (".mlp_ln.", ".final_layer_norm."),
    (".mlp.0.", ".fc1."),
    (".mlp.2.", ".fc2."),
]


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")


def unet_config(size: str = "tiny", audio_dim: int = 32) -> dict:
    """A ``musetalk.json`` config: the released one, or a tiny one with its key set.

    "full": :data:`RELEASED_UNET_CONFIG` (``audio_dim`` ignored: 384).
    "tiny": 3 levels instead of 4 (CrossAttnDown x2 + Down, Up + CrossAttnUp x2),
    widths 32/32/64, one layer per block, ``cross_attention_dim`` ``audio_dim``.
    Input (B, 8, H, W) with H, W divisible by 4 (tiny) or 8 (full); output
    (B, 4, H, W); ``encoder_hidden_states`` (B, L, audio_dim).
    Raises ValueError for an unknown size.
    """
    _check_size(size)
    if size == "full":
        return json.loads(json.dumps(RELEASED_UNET_CONFIG))
    return dict(
        RELEASED_UNET_CONFIG,
        block_out_channels=[32, 32, 64],
        cross_attention_dim=audio_dim,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )


def vae_config(size: str = "tiny") -> dict:
    """The sd-vae-ft-mse ``config.json`` ("full") or its key set with tiny widths.

    Both decode (B, 4, h, w) latents to (B, 3, 8h, 8w). Raises ValueError for an
    unknown size.
    """
    _check_size(size)
    if size == "full":
        return json.loads(json.dumps(RELEASED_VAE_CONFIG))
    return dict(RELEASED_VAE_CONFIG, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)


def write_unet(models_dir: Path, version: str = "v15", size: str = "tiny", audio_dim: int = 32) -> None:
    """Write a random MuseTalk UNet under ``models_dir`` in the released layout.

    Args:
        models_dir: the ``models/`` folder (created if needed).
        version: "v15" -> ``musetalkV15/musetalk.json`` + ``unet.pth``;
            "v1" -> ``musetalk/musetalk.json`` + ``pytorch_model.bin``.
        size: "tiny" or "full" (see :func:`unet_config`).
        audio_dim: tiny ``cross_attention_dim`` (the Whisper width; 384 in the release).
    Raises:
        ValueError: unknown version or size.
    """
    from diffusers import UNet2DConditionModel

    layout = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}
    if version not in layout:
        raise ValueError(f"version must be 'v15' or 'v1', not {version!r}")
    folder_name, weights_name = layout[version]
    folder = Path(models_dir) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    config = unet_config(size, audio_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel.from_config(config)
    (folder / "musetalk.json").write_text(json.dumps(config, indent=2))
    torch.save(unet.state_dict(), folder / weights_name)


def write_vae(folder: Path, old_attention_keys: bool = True, size: str = "tiny") -> None:
    """Write a random sd-vae-ft-mse-style AutoencoderKL folder.

    Files: ``config.json`` and ``diffusion_pytorch_model.bin`` (plain state dict).
    Decoding (B, 4, h, w) gives (B, 3, 8h, 8w).

    Args:
        folder: e.g. ``models/sd-vae`` (created if needed).
        old_attention_keys: store the mid-block attention weights under the old
            names ``query``/``key``/``value``/``proj_attn`` like the released .bin.
        size: "tiny" or "full" (see :func:`vae_config`).
    """
    from diffusers import AutoencoderKL

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = vae_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        vae = AutoencoderKL.from_config(config)
    state = {}
    for key, tensor in vae.state_dict().items():
        if old_attention_keys and ".mid_block.attentions." in key:
            for new, old in _OLD_VAE_ATTENTION_NAMES.items():
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = tensor
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, folder / "diffusion_pytorch_model.bin")


def _whisper_dims(size: str, n_state: int, n_layer: int, n_head: int, n_mels: int, n_audio_ctx: int) -> dict:
    _check_size(size)
    if size == "full":
        return dict(WHISPER_TINY_DIMS)
    return dict(
        n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=n_state, n_audio_head=n_head, n_audio_layer=n_layer,
        n_vocab=64, n_text_ctx=8, n_text_state=n_state, n_text_head=n_head, n_text_layer=1,
    )


def _random_whisper(dims: dict):
    """A seeded openai-whisper ``Whisper`` of the given ``ModelDimensions`` fields."""
    from whisper.model import ModelDimensions, Whisper

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        model = Whisper(ModelDimensions(**dims))
        # TextDecoder.positional_embedding is created with torch.empty (checkpoint-filled).
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    return model


def write_whisper(
    path: Path, n_state: int = 32, n_layer: int = 4, n_head: int = 4, n_mels: int = 80, n_audio_ctx: int = 1500,
    size: str = "tiny",
) -> None:
    """Write a random openai-whisper checkpoint in the ``tiny.pt`` format.

    ``{"dims": {all ModelDimensions fields}, "model_state_dict": full Whisper
    state dict in float16}``, saved with ``torch.save``. The encoder maps
    (B, n_mels, 2 * n_audio_ctx) log-mels to (B, n_audio_ctx, n_state).

    Args:
        path: file to write (e.g. ``models/whisper/tiny.pt``); parents are created.
        n_state, n_layer, n_head: tiny encoder width, blocks and heads
            (tiny.pt: 384, 4, 6); n_mels: mel bins (80); n_audio_ctx: encoder frames
            (1500 = 30 s at 50 Hz).
        size: "full" writes Whisper-tiny's real dimensions (:data:`WHISPER_TINY_DIMS`)
            and ignores the others.
    """
    model = _random_whisper(_whisper_dims(size, n_state, n_layer, n_head, n_mels, n_audio_ctx))
    state = {key: tensor.half() for key, tensor in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": vars(model.dims), "model_state_dict": state}, path)


def write_whisper_hf(
    folder: Path, n_state: int = 32, n_layer: int = 4, n_head: int = 4, n_mels: int = 80, n_audio_ctx: int = 1500,
    size: str = "tiny",
) -> None:
    """Write the same random Whisper as ``write_whisper`` as a transformers folder.

    Files: ``config.json`` (transformers ``WhisperConfig`` fields) and
    ``pytorch_model.bin`` (fp32 state dict with ``model.encoder.*`` /
    ``model.decoder.*`` keys, as in ``openai/whisper-tiny``). Same weights as
    ``write_whisper`` with the same arguments (before its fp16 rounding).
    """
    model = _random_whisper(_whisper_dims(size, n_state, n_layer, n_head, n_mels, n_audio_ctx))
    state = {}
    for key, tensor in model.state_dict().items():
        for old, new in _OPENAI_TO_HF_WHISPER:
            key = key.replace(old, new)
        state["model." + key] = tensor
    dims = model.dims
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "num_mel_bins": dims.n_mels,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "vocab_size": dims.n_vocab,
        "torch_dtype": "float32",
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, folder / "pytorch_model.bin")


def write_models(models_dir: Path, version: str = "v15", audio_dim: int = 32, size: str = "tiny") -> None:
    """Write a complete ``models/`` folder: UNet, ``sd-vae/`` and ``whisper/tiny.pt``.

    Tiny: the Whisper width equals ``audio_dim`` so encoder features feed the
    UNet's cross-attention (384 for both in the release). Full: the released
    sizes (3.81 GB on disk, measured). No face-parsing weights.
    """
    models_dir = Path(models_dir)
    write_unet(models_dir, version, size=size, audio_dim=audio_dim)
    write_vae(models_dir / "sd-vae", size=size)
    write_whisper(models_dir / "whisper" / "tiny.pt", n_state=audio_dim, size=size)
