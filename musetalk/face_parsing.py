"""BiSeNet face parsing for MuseTalk's blend masks (``models/face-parse-bisent/79999_iter.pth``).

BiSeNet (Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time
Semantic Segmentation", ECCV 2018, arXiv 1808.00897) as trained on CelebAMask-HQ
by the public face-parsing.PyTorch project, whose released checkpoint
``79999_iter.pth`` MuseTalk uses. Written here in plain ``torch.nn`` (torchvision
is not needed) with the module names of that checkpoint, so it loads strictly (names,
kernel sizes, nearest upsampling in the context path and the final bilinear
``align_corners=True`` checked against that project's ``model.py``; the released
file itself has not been loaded here):

- context path ``cp``: a ResNet-18 backbone ``cp.resnet`` (conv1/bn1, max-pool,
  layer1..layer4 of two basic blocks each, strides 4/8/16/32, no fc), attention
  refinement modules ``cp.arm16`` / ``cp.arm32`` on the stride-16/32 features, a
  global-context branch ``cp.conv_avg`` and the heads ``cp.conv_head32`` /
  ``cp.conv_head16`` that upsample the refined features to strides 16 and 8;
- spatial path: as in the released model, the backbone's stride-8 feature
  (layer2, 128 channels) stands in for BiSeNet's separate spatial path, so the
  checkpoint has no ``sp.*`` weights;
- feature fusion ``ffm`` (concatenate spatial + context, 1x1 conv block,
  channel attention ``conv1``/``conv2``, residual);
- outputs ``conv_out`` (main, 256 -> 19) and the auxiliary ``conv_out16`` /
  ``conv_out32`` heads (kept so the checkpoint loads strictly; parsing uses the
  main head only).

Input: RGB 512x512 normalised with the ImageNet mean/std. Output classes
(CelebAMask-HQ, 19): 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye,
6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip,
14 neck, 15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 19  # CelebAMask-HQ labels (see the module docstring)
PARSE_SIZE = 512  # input side the released model was trained at
# ImageNet normalisation (RGB), as used to train the released model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP = 1, 10, 11, 12, 13
LOWER_FACE = (SKIN, MOUTH, UPPER_LIP, LOWER_LIP)  # classes a blend mask may cover
MASK_MODES = ("raw", "jaw")
# "jaw" mode (MuseTalk v1.5), in pixels of the PARSE_SIZE parse space (scaled to the
# map's width): the central band left/right of the face centre where the mask keeps
# its full extent (MuseTalk v1.5's cheek width, 90 px each side); the erosion of the
# mask outside that band, so the cheek edges next to background and hair stay
# original (our choice: ~5% of the face width at MuseTalk's 1.5x crop); the downward
# reach of the skin, so a chin that drops as the mouth opens is still blended in
# (our choice: ~10% of the face height).
CHEEK_WIDTH = 90
CHEEK_ERODE = 16
JAW_DILATE = 32
CHECKPOINT_HINT = "models/face-parse-bisent/79999_iter.pth (face-parsing.PyTorch BiSeNet, 19 classes)"


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs + identity (or 1x1 conv + BN ``downsample``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch))


class ResNet18(nn.Module):
    """ResNet-18 feature extractor (He et al. 2016) without the classifier.

    forward: (B, 3, H, W) -> features at strides 8, 16, 32 with 128, 256, 512 channels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """3x3 conv block, then channel attention from the global average (1x1 conv, BN, sigmoid)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))
        return feat * attention


class ContextPath(nn.Module):
    """Backbone + attention refinement + global context.

    forward: (B, 3, H, W) -> (stride-8 backbone feature (B, 128, H/8, W/8),
    context at stride 8 (B, 128, H/8, W/8), context at stride 16 (B, 128, H/16, W/16)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(feat32.mean((2, 3), keepdim=True))
        up32 = self.arm32(feat32) + context  # broadcast = nearest upsampling of a 1x1 map
        up32 = self.conv_head32(F.interpolate(up32, feat16.shape[2:], mode="nearest"))
        up16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(F.interpolate(up16, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    """Concatenate spatial and context features, 1x1 conv block, channel attention + residual."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, kernel=1)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat + feat * attention


class OutputHead(nn.Module):
    """3x3 conv block then a 1x1 classifier (no bias) to ``n_classes`` logits."""

    def __init__(self, in_ch: int, mid_ch: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser with the released checkpoint's layout (see the module docstring).

    forward: float32 (B, 3, H, W) normalised RGB, H and W multiples of 32 ->
    logits (B, n_classes, H, W) of the main head (bilinear upsampling from stride 8).
    """

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, n_classes)
        self.conv_out16 = OutputHead(128, 64, n_classes)  # auxiliary training heads
        self.conv_out32 = OutputHead(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(spatial, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


class FaceParser:
    """A loaded BiSeNet in eval mode on one device (see ``load_face_parser``)."""

    def __init__(self, net: BiSeNet, device: torch.device) -> None:
        self.net = net.eval().to(device)
        self.device = device
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def parse(self, bgr_crop: np.ndarray) -> np.ndarray:
        """Class map of a face crop.

        bgr_crop: uint8 (H, W, 3) BGR, ideally the face with some margin (MuseTalk
        parses the 1.5x crop box). It is resized to PARSE_SIZE x PARSE_SIZE
        (bilinear), parsed, and the map is resized back (nearest).
        Returns uint8 (H, W) CelebAMask-HQ class ids (0..18).
        """
        h, w = bgr_crop.shape[:2]
        rgb = cv2.cvtColor(cv2.resize(bgr_crop, (PARSE_SIZE, PARSE_SIZE), interpolation=cv2.INTER_LINEAR),
                           cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255)
        classes = self.net((x - self._mean) / self._std)[0].argmax(0).to(torch.uint8).cpu().numpy()
        if (h, w) == classes.shape:
            return classes
        return cv2.resize(classes, (w, h), interpolation=cv2.INTER_NEAREST)


def load_face_parser(path: str | Path, device: str | torch.device = "cpu") -> FaceParser:
    """Load the released ``79999_iter.pth`` (a plain BiSeNet state dict) strictly.

    BatchNorm ``num_batches_tracked`` counters, which checkpoints saved by old
    PyTorch versions lack, are filled in; every other key must match exactly.
    Raises FileNotFoundError for a missing file, ValueError (naming the missing and
    unexpected keys, or the shape mismatch) for a file of another layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face-parsing weights not found: {path} (expected {CHECKPOINT_HINT})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise ValueError(f"{path}: not a PyTorch state dict ({e}); expected {CHECKPOINT_HINT}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, expected a state dict: {CHECKPOINT_HINT}")
    net = BiSeNet()
    expected = net.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, value)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the BiSeNet face-parsing layout ({CHECKPOINT_HINT}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: BiSeNet weights do not fit ({CHECKPOINT_HINT}): {e}") from e
    return FaceParser(net, torch.device(device))


def face_mask(classes: np.ndarray, mode: str = "jaw", centre_x: float | None = None) -> np.ndarray:
    """Binary lower-face blend mask from a class map (before MuseTalk's box gating and blur).

    classes: uint8 (H, W) class ids from ``FaceParser.parse`` of a crop around the
    face. mode "raw" (MuseTalk v1.0): skin, mouth and both lips. mode "jaw" (v1.5):
    the same region dilated JAW_DILATE px downward, eroded by CHEEK_ERODE px outside
    the central band of CHEEK_WIDTH px each side of ``centre_x`` (default: the map's
    centre column), nose excluded; pixel sizes are in PARSE_SIZE space, scaled by
    W / PARSE_SIZE. Returns uint8 (H, W), 255 inside the mask, 0 outside.
    Raises ValueError for an unknown mode.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown face-parsing mask mode {mode!r}: use one of {MASK_MODES}")
    mask = np.isin(classes, LOWER_FACE).astype(np.uint8) * 255
    if mode == "raw":
        return mask
    h, w = classes.shape
    scale = w / PARSE_SIZE
    reach = max(1, round(JAW_DILATE * scale))
    mask = cv2.dilate(mask, np.ones((reach + 1, 1), np.uint8), anchor=(0, reach))
    radius = max(1, round(CHEEK_ERODE * scale))
    eroded = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    centre = w / 2 if centre_x is None else centre_x
    band = np.abs(np.arange(w) + 0.5 - centre) < CHEEK_WIDTH * scale
    mask = np.where(band[None, :], mask, eroded)
    mask[classes == NOSE] = 0
    return mask
