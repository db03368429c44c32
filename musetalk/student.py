"""Smaller MuseTalk networks for distillation: a BK-SDM-Tiny-shaped UNet and a TAESD decoder.

Student UNet (BK-SDM, Kim et al. 2023, arXiv 2305.15798, "Tiny" variant; its
released ``unet_config/bk_tiny/config.json``), applied to MuseTalk's SD-1.5-shaped
UNet (``musetalk.json``):

- the mid-block is removed (``mid_block_type`` None);
- the innermost down stage (``DownBlock2D``, no attention) and the outermost up
  stage (``UpBlock2D``) are removed, so 3 of SD's 4 resolution levels remain;
- each remaining down stage keeps one residual+attention pair (of 2), each up stage
  two (of 3): ``layers_per_block`` 1;
- optionally (``width`` < 1, beyond BK-SDM) every channel count is scaled down:
  the recipe alone removes mostly cheap low-resolution blocks (measured in
  ``docs/benchmarks.md``);
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
import math

import torch
from torch import nn

__all__ = [
    "student_unet_config",
    "init_from_teacher",
    "teacher_key",
    "feature_pairs",
    "feature_channels",
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


def _channel_step(config: dict) -> int:
    """Channel counts must divide into the norm groups and the attention heads
    (SD-1.x configs give the head COUNT as ``attention_head_dim``)."""
    heads = config.get("attention_head_dim", 8)
    heads = max(heads) if isinstance(heads, (list, tuple)) else heads
    return math.lcm(int(config.get("norm_num_groups", 32)), int(heads))


def student_unet_config(teacher_config: dict, width: float = 1.0) -> dict:
    """BK-SDM-Tiny's reduction of a MuseTalk UNet config (see the module docstring).

    Args:
        teacher_config: a ``musetalk.json``-style ``UNet2DConditionModel`` config
            whose last down stage is a ``DownBlock2D`` and first up stage an
            ``UpBlock2D`` (SD-1.x layout; also the tiny test configs of
            ``musetalk.checkpoints``).
        width: channel multiplier on top of the recipe (1.0: BK-SDM-Tiny exactly).
            BK-SDM-Tiny removes the cheap low-resolution blocks, so at MuseTalk's
            32x32 latents it costs 54 of the teacher's 89 GMACs per frame; 0.6 gives
            channels (192, 384, 768) and 20 GMACs. Channels are rounded to a
            multiple of the norm groups and head count.
    Returns:
        a new config dict: same keys plus ``mid_block_type: None``; one resolution
        level fewer; ``layers_per_block`` 1; in/out channels, ``cross_attention_dim``,
        ``attention_head_dim``, norms and time embedding as the teacher's.
    Raises:
        ValueError: the teacher does not have that layout (nothing to drop), or
            ``width`` is not in (0, 1].
    """
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    down, up = list(teacher_config["down_block_types"]), list(teacher_config["up_block_types"])
    widths = list(teacher_config["block_out_channels"])
    if len(down) < 2 or down[-1] != "DownBlock2D" or up[0] != "UpBlock2D" or len(up) != len(down):
        raise ValueError(
            "expected an SD-style UNet whose innermost stages have no attention "
            f"(down ... DownBlock2D, up UpBlock2D ...), got down {down}, up {up}"
        )
    config = copy.deepcopy(dict(teacher_config))
    step = _channel_step(teacher_config)
    config.update(
        block_out_channels=[max(step, round(c * width / step) * step) for c in widths[:-1]],
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
        ``{"copied": n, "sliced": n, "total": n, "kept_random": [keys]}``: tensors
        copied whole (name mapped, shape equal); for a narrower student
        (``width`` < 1), tensors started from the teacher's leading channels in
        every dimension (an approximate start: for the concatenated skip inputs
        of up blocks the leading slice does not line up with the skip channels);
        and those left at their random initialisation.
    """
    kept, sliced = [], 0
    own = student.state_dict()
    for key, tensor in own.items():
        source = teacher_state.get(teacher_key(key, teacher_config))
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source.to(tensor.dtype))
        elif source is not None and source.ndim == tensor.ndim and all(
            s >= t for s, t in zip(source.shape, tensor.shape)
        ):
            tensor.copy_(source[tuple(slice(0, n) for n in tensor.shape)].to(tensor.dtype))
            sliced += 1
        else:
            kept.append(key)
    return {"copied": len(own) - len(kept) - sliced, "sliced": sliced, "total": len(own), "kept_random": kept}


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


def feature_channels(config: dict, name: str) -> int:
    """Channels of the output of a :func:`feature_pairs` module of a UNet of ``config``."""
    widths = list(config["block_out_channels"])
    stage = int(name.split(".")[1])
    return widths[stage] if name.startswith("down_blocks.") else widths[::-1][stage]


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

