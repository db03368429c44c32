"""Smaller MuseTalk networks for distillation: a BK-SDM-Tiny-shaped UNet and a TAESD decoder.

Student UNet (BK-SDM, Kim et al. 2023, arXiv 2305.15798, "Tiny" variant; its
released ``unet_config/bk_tiny/config.json``), applied to MuseTalk's SD-1.5-shaped
UNet (``musetalk.json``):

- the mid-block is removed (``mid_block_type`` None);
- the innermost down stage (``DownBlock2D``, no attention) and the outermost up
  stage (``UpBlock2D``) are removed, so 3 of SD's 4 resolution levels remain;
- each remaining down stage keeps one residual+attention pair (of 2), each up stage
  two (of 3): ``layers_per_block`` 1;
- everything MuseTalk's interface depends on is kept: 8 input channels (masked +
  reference latents), 4 output channels, ``cross_attention_dim`` (384: Whisper-tiny
  tokens), head size, norm groups, time embedding.

At the released size that is 318M parameters instead of 850M (see
``bench/distill_speed.py`` for the cost). :func:`init_from_teacher` copies the
teacher's matching blocks (BK-SDM's initialisation): down stage ``i`` pair 0 <-
teacher pair 0; student up stage ``k`` <- teacher up stage ``k + 1``, its pairs
(0, 1) <- teacher pairs (0, last) (the dropped middle pair is the one whose skip
connection no longer exists); stem, time embedding and output head unchanged.
:func:`feature_pairs` names BK-SDM-Tiny's feature-distillation points: the output
of each kept stage (the last down stage at its attention's ``proj_out``, since
the teacher's downsamples there and the student's does not).

Tiny decoder: diffusers' ``AutoencoderTiny`` (TAESD, github.com/madebyollin/taesd),
whose decoder takes SCALED SD latents (x 0.18215, the UNet's own output space) and
returns (B, 3, 8h, 8w) in [-1, 1]. :func:`tiny_vae_config` gives TAESD's released
widths ("full") or test widths ("tiny").
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

__all__ = [
    "student_unet_config",
    "init_from_teacher",
    "teacher_key",
    "feature_pairs",
    "tiny_vae_config",
    "TINY_VAE_CONFIG",
]

# diffusers AutoencoderTiny defaults = TAESD's released SD-1.x model (madebyollin/taesd
# config.json): 64-wide encoder and decoder, ~2.4M parameters in all.
TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderTiny",
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
}


def student_unet_config(teacher_config: dict) -> dict:
    """BK-SDM-Tiny's reduction of a MuseTalk UNet config (see the module docstring).

    Args:
        teacher_config: a ``musetalk.json``-style ``UNet2DConditionModel`` config
            whose last down stage is a ``DownBlock2D`` and first up stage an
            ``UpBlock2D`` (SD-1.x layout; also the tiny test configs of
            ``musetalk.checkpoints``).
    Returns:
        a new config dict: same keys plus ``mid_block_type: None``; one resolution
        level fewer; ``layers_per_block`` 1; in/out channels, ``cross_attention_dim``,
        ``attention_head_dim``, norms and time embedding as the teacher's.
    Raises:
        ValueError: the teacher does not have that layout (nothing to drop).
    """
    down, up = list(teacher_config["down_block_types"]), list(teacher_config["up_block_types"])
    widths = list(teacher_config["block_out_channels"])
    if len(down) < 2 or down[-1] != "DownBlock2D" or up[0] != "UpBlock2D" or len(up) != len(down):
        raise ValueError(
            "expected an SD-style UNet whose innermost stages have no attention "
            f"(down ... DownBlock2D, up UpBlock2D ...), got down {down}, up {up}"
        )
    config = copy.deepcopy(dict(teacher_config))
    config.update(
        block_out_channels=widths[:-1],
        down_block_types=down[:-1],
        up_block_types=up[1:],
        layers_per_block=1,
        mid_block_type=None,
    )
    config.pop("_diffusers_version", None)
    return config


def _stage_maps(teacher_config: dict) -> list[tuple[str, str]]:
    """(student prefix, teacher prefix) pairs, most specific first."""
    n = len(teacher_config["down_block_types"]) - 1  # student stages
    last = int(teacher_config["layers_per_block"])  # teacher up stages have last + 1 pairs
    pairs = []
    for i in range(n):
        for part in ("resnets", "attentions"):
            pairs.append((f"down_blocks.{i}.{part}.0.", f"down_blocks.{i}.{part}.0."))
        pairs.append((f"down_blocks.{i}.downsamplers.", f"down_blocks.{i}.downsamplers."))
    for k in range(n):
        for part in ("resnets", "attentions"):
            pairs.append((f"up_blocks.{k}.{part}.0.", f"up_blocks.{k + 1}.{part}.0."))
            pairs.append((f"up_blocks.{k}.{part}.1.", f"up_blocks.{k + 1}.{part}.{last}."))
        pairs.append((f"up_blocks.{k}.upsamplers.", f"up_blocks.{k + 1}.upsamplers."))
    return pairs


def teacher_key(student_key: str, teacher_config: dict) -> str:
    """The teacher state-dict key a student key is initialised from (same name for
    the stem, time embedding and output head)."""
    for s, t in _stage_maps(teacher_config):
        if student_key.startswith(s):
            return t + student_key[len(s):]
    return student_key


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher_state: dict, teacher_config: dict) -> dict:
    """Copy the teacher's matching blocks into ``student`` (in place).

    Args:
        student: a ``UNet2DConditionModel`` built from :func:`student_unet_config`
            of ``teacher_config`` (real tensors, not meta).
        teacher_state: the teacher's state dict (``unet.pth``; any dtype/device).
        teacher_config: the teacher's config.
    Returns:
        ``{"copied": n, "total": n, "kept_random": [keys]}``: tensors copied (name
        mapped and shape equal) and those left at their random initialisation.
    """
    kept = []
    own = student.state_dict()
    for key, tensor in own.items():
        source = teacher_state.get(teacher_key(key, teacher_config))
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source.to(tensor.dtype))
        else:
            kept.append(key)
    return {"copied": len(own) - len(kept), "total": len(own), "kept_random": kept}


def feature_pairs(teacher_config: dict) -> list[tuple[str, str]]:
    """(student module, teacher module) names whose outputs feature KD matches.

    BK-SDM-Tiny's points: every down stage's output but the last, the last kept
    down stage at its (last) attention's ``proj_out``, and every kept up stage's
    output against the teacher stage it came from. Shapes match pairwise.
    """
    n = len(teacher_config["down_block_types"]) - 1
    last = int(teacher_config["layers_per_block"]) - 1
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(n - 1)]
    pairs.append((f"down_blocks.{n - 1}.attentions.0.proj_out", f"down_blocks.{n - 1}.attentions.{last}.proj_out"))
    pairs += [(f"up_blocks.{k}", f"up_blocks.{k + 1}") for k in range(n)]
    return pairs


def tiny_vae_config(size: str = "full") -> dict:
    """``AutoencoderTiny`` config: TAESD's ("full") or 8-wide, one block per stage ("tiny").

    Both decode (B, 4, h, w) scaled latents to (B, 3, 8h, 8w). Raises ValueError
    for another size.
    """
    if size == "full":
        return copy.deepcopy(TINY_VAE_CONFIG)
    if size == "tiny":
        return dict(copy.deepcopy(TINY_VAE_CONFIG), encoder_block_out_channels=[8, 8, 8, 8],
                    decoder_block_out_channels=[8, 8, 8, 8], num_encoder_blocks=[1, 1, 1, 1],
                    num_decoder_blocks=[1, 1, 1, 1])
    raise ValueError(f"size must be 'full' or 'tiny', not {size!r}")


def block_name(key: str) -> str:
    """The stage a state-dict key belongs to (``down_blocks.1``, ``conv_in``...), for reports."""
    m = re.match(r"((?:down|up)_blocks\.\d+|mid_block|[a-z_]+)", key)
    return m.group(1) if m else key
