"""Tiny MuseTalk checkpoints written in the exact released file formats (for tests).

The layouts and formats follow ``../shared/docs/musetalk-facts.md``:

- ``musetalkV15/musetalk.json`` + ``unet.pth`` (v1.5) or ``musetalk/musetalk.json``
  + ``pytorch_model.bin`` (v1.0): a diffusers ``UNet2DConditionModel`` config in the
  SD-1.x era key set (``_diffusers_version`` 0.6.0) and a plain ``torch.save``'d
  state dict with diffusers key names, no prefix.
- ``sd-vae/config.json`` + ``diffusion_pytorch_model.bin``: the sd-vae-ft-mse key
  set, with the mid-block attention weights under the OLD names
  (``query``/``key``/``value``/``proj_attn``) as in the real ``.bin``.
- ``whisper/tiny.pt``: openai-whisper's checkpoint dict
  ``{"dims": {...ModelDimensions...}, "model_state_dict": {...}}`` holding the
  whole Whisper model in float16, like the released file.
- ``whisper/config.json`` + ``pytorch_model.bin``: the transformers
  ``openai/whisper-tiny`` layout (``model.encoder.*`` / ``model.decoder.*`` keys, fp32).

Architectures are MuseTalk's (8 input / 4 output channels, cross-attention on the
audio width, VAE factor 8) with tiny widths, so a forward pass takes milliseconds.
Every writer seeds its own RNG (without touching the global one), so files and
outputs are reproducible. Imported by tests; holds no tests itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SEED = 1234

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


def tiny_unet_config(audio_dim: int = 32) -> dict:
    """A musetalk.json-style config of a tiny MuseTalk UNet.

    Same key set and block structure as the released ``musetalk.json``
    (3 levels here instead of 4: CrossAttnDown x2 + Down, Up + CrossAttnUp x2).
    Input (B, 8, H, W) with H, W divisible by 4; output (B, 4, H, W);
    ``encoder_hidden_states`` (B, L, audio_dim).
    """
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 32, 64],
        "center_input_sample": False,
        "cross_attention_dim": audio_dim,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }


def tiny_vae_config() -> dict:
    """The sd-vae-ft-mse ``config.json`` key set with tiny widths (factor 8, 4 latents)."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.4.2",
        "act_fn": "silu",
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def write_tiny_musetalk(models_dir: Path, version: str = "v15", audio_dim: int = 32) -> None:
    """Write a tiny MuseTalk UNet under ``models_dir`` in the released layout.

    Args:
        models_dir: the ``models/`` folder (created if needed).
        version: "v15" -> ``musetalkV15/musetalk.json`` + ``unet.pth``;
            "v1" -> ``musetalk/musetalk.json`` + ``pytorch_model.bin``.
        audio_dim: ``cross_attention_dim`` (the Whisper width; 384 in the release).
    Raises:
        ValueError: unknown version.
    """
    from diffusers import UNet2DConditionModel

    layout = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}
    if version not in layout:
        raise ValueError(f"version must be 'v15' or 'v1', not {version!r}")
    folder_name, weights_name = layout[version]
    folder = Path(models_dir) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_unet_config(audio_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(config)
    (folder / "musetalk.json").write_text(json.dumps(config, indent=2))
    torch.save(unet.state_dict(), folder / weights_name)


def write_tiny_vae(folder: Path, old_attention_keys: bool = True) -> None:
    """Write a tiny sd-vae-ft-mse-style AutoencoderKL folder.

    Files: ``config.json`` and ``diffusion_pytorch_model.bin`` (plain state dict).
    Decoding (B, 4, h, w) gives (B, 3, 8h, 8w).

    Args:
        folder: e.g. ``models/sd-vae`` (created if needed).
        old_attention_keys: store the mid-block attention weights under the old
            names ``query``/``key``/``value``/``proj_attn`` like the released .bin.
    """
    from diffusers import AutoencoderKL

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_vae_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        vae = AutoencoderKL.from_config(config)
    state = {}
    for key, tensor in vae.state_dict().items():
        if old_attention_keys and ".mid_block.attentions." in key:
            for new, old in _OLD_VAE_ATTENTION_NAMES.items():
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = tensor
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, folder / "diffusion_pytorch_model.bin")


def _tiny_whisper(n_state: int, n_layer: int, n_head: int, n_mels: int, n_audio_ctx: int):
    """A seeded openai-whisper ``Whisper`` with the given encoder and a 1-layer decoder."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=n_audio_ctx,
        n_audio_state=n_state,
        n_audio_head=n_head,
        n_audio_layer=n_layer,
        n_vocab=64,
        n_text_ctx=8,
        n_text_state=n_state,
        n_text_head=n_head,
        n_text_layer=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 2)
        model = Whisper(dims)
        # TextDecoder.positional_embedding is created with torch.empty (checkpoint-filled).
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    return model


def write_tiny_whisper(
    path: Path, n_state: int = 32, n_layer: int = 4, n_head: int = 4, n_mels: int = 80, n_audio_ctx: int = 1500
) -> None:
    """Write a tiny openai-whisper checkpoint in the ``tiny.pt`` format.

    ``{"dims": {all ModelDimensions fields}, "model_state_dict": full Whisper
    state dict in float16}``, saved with ``torch.save``. The encoder maps
    (B, n_mels, 2 * n_audio_ctx) log-mels to (B, n_audio_ctx, n_state).

    Args:
        path: file to write (e.g. ``models/whisper/tiny.pt``); parents are created.
        n_state, n_layer, n_head: encoder width, blocks and heads (tiny.pt: 384, 4, 6).
        n_mels: mel bins (80); n_audio_ctx: encoder frames (1500 = 30 s at 50 Hz).
    """
    model = _tiny_whisper(n_state, n_layer, n_head, n_mels, n_audio_ctx)
    state = {key: tensor.half() for key, tensor in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": vars(model.dims), "model_state_dict": state}, path)


def write_tiny_whisper_hf(
    folder: Path, n_state: int = 32, n_layer: int = 4, n_head: int = 4, n_mels: int = 80, n_audio_ctx: int = 1500
) -> None:
    """Write the same tiny Whisper as ``write_tiny_whisper`` as a transformers folder.

    Files: ``config.json`` (transformers ``WhisperConfig`` fields) and
    ``pytorch_model.bin`` (fp32 state dict with ``model.encoder.*`` /
    ``model.decoder.*`` keys, as in ``openai/whisper-tiny``). Same weights as
    ``write_tiny_whisper`` with the same arguments (before its fp16 rounding).
    """
    model = _tiny_whisper(n_state, n_layer, n_head, n_mels, n_audio_ctx)
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


def write_tiny_models(models_dir: Path, version: str = "v15", audio_dim: int = 32) -> None:
    """Write a complete tiny ``models/`` folder: UNet, ``sd-vae/`` and ``whisper/tiny.pt``.

    The Whisper width equals ``audio_dim`` so encoder features feed the UNet's
    cross-attention (384 for both in the release). No face-parsing weights.
    """
    models_dir = Path(models_dir)
    write_tiny_musetalk(models_dir, version, audio_dim=audio_dim)
    write_tiny_vae(models_dir / "sd-vae")
    write_tiny_whisper(models_dir / "whisper" / "tiny.pt", n_state=audio_dim)
