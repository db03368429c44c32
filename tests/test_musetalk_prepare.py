"""Tests for musetalk/prepare.py and musetalk/face_parsing.py (CPU, tiny random VAE)."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import avatar as A  # noqa: E402
from musetalk import face_parsing as FP  # noqa: E402
from musetalk import prepare as P  # noqa: E402

YONGEN = Path(__file__).resolve().parents[1].parent / "shared" / "media" / "yongen.mp4"


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), norm_num_groups=8,
        latent_channels=4, sample_size=256,
    ).eval()


class CountingVAE:
    """Wraps a VAE and counts its encode calls and encoded images."""

    def __init__(self, vae) -> None:
        self.vae, self.calls, self.images, self.inputs = vae, 0, 0, []

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def encode(self, x):
        self.calls += 1
        self.images += len(x)
        self.inputs.append(x.detach().clone())
        return self.vae.encode(x)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def default_avatar(tmp_path_factory) -> A.Avatar:
    return A.ensure_default_avatar(tmp_path_factory.mktemp("avatars"))


def hand_avatar(path: Path, frames: list[np.ndarray], landmarks: list[np.ndarray | None]) -> A.Avatar:
    """An Avatar built in memory: ping-pong loop of ``frames`` (NaN landmarks for None)."""
    lm = np.stack([np.full((68, 2), np.nan, np.float32) if x is None else x.astype(np.float32) for x in landmarks])
    size = frames[0].shape[1::-1]
    boxes = np.full((3, len(frames), 4), -1, np.int32)
    for k, x in enumerate(lm):
        if np.isfinite(x).all():
            boxes[0, k] = A.face_box_from_landmarks(x, frame_size=size)
            boxes[1, k] = A.expand_box(tuple(boxes[0, k]), A.CROP_SCALE, size)
            boxes[2, k] = A.mouth_box_from_landmarks(x, size)
    n = len(frames)
    order = list(range(n)) + list(range(n - 1, -1, -1)) if n > 1 else [0]
    return A.Avatar("hand", path, [frames[k] for k in order], lm[order], *(b[order] for b in boxes))


# ---------------------------------------------------------------------------
# Face parsing


def test_face_parser_loads_released_layout_strictly(tmp_path):
    torch.manual_seed(0)
    net = FP.BiSeNet()
    state = net.state_dict()
    assert "cp.resnet.layer4.1.bn2.running_var" in state and "ffm.convblk.conv.weight" in state
    assert "conv_out32.conv_out.weight" in state and "cp.resnet.layer2.0.downsample.1.weight" in state
    assert not any(k.startswith("sp.") or "fc" in k for k in state)
    path = tmp_path / "79999_iter.pth"
    # The 2019 release predates PyTorch's zip format (1.6) and BatchNorm's
    # num_batches_tracked counters: legacy format, counters filled in.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path,
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    parser = FP.load_face_parser(path)
    loaded = parser.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    classes = parser.parse(np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8))
    assert classes.shape == (120, 100) and classes.dtype == np.uint8 and classes.max() < FP.N_CLASSES
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 64, 96)).shape == (2, FP.N_CLASSES, 64, 96)

    renamed = dict(state)
    renamed["cp.arm16.conv_attention.weight"] = renamed.pop("cp.arm16.conv_atten.weight")
    torch.save(renamed, path)
    with pytest.raises(ValueError, match=r"missing keys \['cp.arm16.conv_atten.weight'\].*conv_attention"):
        FP.load_face_parser(path)
    wrong = dict(state)
    wrong["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match="do not fit"):
        FP.load_face_parser(path)
    with pytest.raises(FileNotFoundError, match="face-parse-bisent"):
        FP.load_face_parser(tmp_path / "absent.pth")


def synthetic_classes() -> np.ndarray:
    """A 512x512 class map: a skin face (x 96..416, y 64..400), nose, lips, neck below."""
    c = np.zeros((512, 512), np.uint8)
    c[64:400, 96:416] = FP.SKIN
    c[400:, 180:332] = 14  # neck
    c[180:290, 236:276] = FP.NOSE
    c[320:336, 206:306] = FP.UPPER_LIP
    c[336:346, 206:306] = FP.MOUTH
    c[346:362, 206:306] = FP.LOWER_LIP
    return c


def test_face_mask_modes():
    c = synthetic_classes()
    raw = FP.face_mask(c, "raw")
    assert raw[350, 256] == raw[200, 120] == 255 and raw[250, 256] == 0  # lips, skin in; nose out
    assert raw[420, 256] == 0 and raw[30, 256] == 0  # neck, background out
    jaw = FP.face_mask(c, "jaw")
    assert jaw[250, 256] == 0 and jaw[350, 256] == 255
    assert jaw[400 + FP.JAW_DILATE - 1, 256] == 255 and jaw[400 + FP.JAW_DILATE + 1, 256] == 0  # skin reaches down
    # The cheek edge outside the central band is eroded, inside the band it is not.
    assert raw[300, 100] == 255 and jaw[300, 100] == 0 and jaw[300, 96 + FP.CHEEK_ERODE + 2] == 255
    assert jaw[399 + FP.JAW_DILATE, 256] == 255
    half = FP.face_mask(cv2.resize(c, (256, 256), interpolation=cv2.INTER_NEAREST), "jaw")
    assert half.shape == (256, 256) and half[200 + FP.JAW_DILATE // 2 - 1, 128] == 255
    with pytest.raises(ValueError, match="mode"):
        FP.face_mask(c, "neck")


# ---------------------------------------------------------------------------
# Crops and VAE inputs


def test_crop_face_pads_at_frame_edges():
    frame = np.zeros((100, 120, 3), np.uint8)
    frame[:, :, 0] = np.arange(120, dtype=np.uint8)[None, :]  # blue ramp along x
    frame[:, :, 2] = 200
    crop = P.crop_face(frame, (-40, 10, 40, 90))  # half outside on the left
    assert crop.shape == (P.FACE_SIZE, P.FACE_SIZE, 3) and crop.dtype == np.uint8
    assert (crop[:, :100, 0] <= 1).all()  # replicated edge column (x = 0), not shifted content
    assert (crop[:, -1, 0] > 30).all()
    inside = P.crop_face(frame, (20, 10, 100, 90))
    assert inside[:, 0, 0].mean() < inside[:, -1, 0].mean()
    for bad in [(130, 0, 150, 20), (10, 10, 10, 30)]:
        with pytest.raises(ValueError):
            P.crop_face(frame, bad)


def test_vae_inputs_mask_bottom_half():
    crop = np.zeros((P.FACE_SIZE, P.FACE_SIZE, 3), np.uint8)
    crop[..., 0] = 255  # pure blue in BGR
    crop[..., 1] = 128
    masked, reference = P.vae_inputs([crop, crop])
    assert masked.shape == reference.shape == (2, 3, P.FACE_SIZE, P.FACE_SIZE)
    assert masked.dtype == torch.float32
    half = P.FACE_SIZE // 2
    assert (masked[:, :, half:] == -1).all()
    assert torch.equal(masked[:, :, :half], reference[:, :, :half])
    assert torch.allclose(reference[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)  # RGB


# ---------------------------------------------------------------------------
# Preparation on the default avatar


def test_prepare_default_avatar_and_cache(default_avatar, vae, caplog):
    counting = CountingVAE(vae)
    m = P.prepare_musetalk(default_avatar, counting, batch_size=4)
    assert m.latents.shape == (1, 8, 32, 32) and m.latents.dtype == np.float16
    assert m.valid.tolist() == [True] and len(m.masks) == len(m.face_boxes) == len(m.crop_boxes) == 1
    assert counting.calls == 1 and counting.images == 2
    x = counting.inputs[0]
    half = P.FACE_SIZE // 2
    assert (x[0, :, half:] == -1).all() and (x[1, :, half:] > -1).any()  # masked first, then reference
    assert torch.equal(x[0, :, :half], x[1, :, :half])
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * P.VAE_SCALE
    latents = torch.from_numpy(m.latents[0].astype(np.float32))
    assert torch.allclose(latents[:4], expected[0], atol=2e-3) and torch.allclose(latents[4:], expected[1], atol=2e-3)
    # v1.5 box: the avatar's landmarks with extra_margin 10.
    lm = default_avatar.landmarks[0]
    assert tuple(m.face_boxes[0]) == A.face_box_from_landmarks(lm, 0, 10)
    assert m.path.parent == default_avatar.path and m.path.name.startswith("musetalk-v15-")
    assert {p.name for p in m.path.iterdir()} == {"manifest.json", *P.FILES}

    caplog.set_level(logging.INFO, logger="musetalk.prepare")
    again = P.prepare_musetalk(default_avatar, counting, batch_size=4)
    assert counting.calls == 1 and "reusing cache" in caplog.text
    assert np.array_equal(again.latents, m.latents) and again.path == m.path
    assert P.load_musetalk_avatar(default_avatar, vae).path == m.path

    shifted = P.prepare_musetalk(default_avatar, counting, version="v1", bbox_shift=5)
    assert counting.calls == 2 and shifted.path != m.path
    assert tuple(shifted.face_boxes[0]) == A.face_box_from_landmarks(lm, 5, 0)
    other_vae = tiny_vae()
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.mul_(2)
    with pytest.raises(FileNotFoundError, match="musetalk.prepare"):
        P.load_musetalk_avatar(default_avatar, other_vae)


def test_paste_patch_and_mask(default_avatar, vae):
    m = P.prepare_musetalk(default_avatar, vae)
    face = np.full((P.FACE_SIZE, P.FACE_SIZE, 3), 255, np.uint8)
    patch = m.paste(0, face)
    x1, y1, x2, y2 = patch.box
    assert patch.box == tuple(m.crop_boxes[0]) and 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert patch.image.shape == (y2 - y1, x2 - x1, 3) and patch.mask.shape == (y2 - y1, x2 - x1)
    assert patch.mask.dtype == np.float32 and 0 <= patch.mask.min() and patch.mask.max() <= 1
    fx1, fy1, fx2, fy2 = m.face_boxes[0]
    centre = (fy1 + fy2) // 2 - y1
    assert (patch.mask[:centre] == 0).all()
    mouth = default_avatar.landmarks[0][A.LIPS].mean(axis=0) - (x1, y1)
    assert patch.mask[int(mouth[1]), int(mouth[0])] > 0.9
    # The face fills the face box; outside it the patch is the original frame.
    assert (patch.image[fy1 - y1 : fy2 - y1, fx1 - x1 : fx2 - x1] == 255).all()
    frame = default_avatar.frames[0]
    assert np.array_equal(patch.image[: fy1 - y1], frame[y1:fy1, x1:x2])
    out = default_avatar.composite(0, patch)
    assert np.array_equal(out[: y1 + centre], frame[: y1 + centre])  # above the centre: untouched
    assert out[int(mouth[1]) + y1, int(mouth[0]) + x1].min() > 240
    assert m.loop_latents([0, 5]).shape == (2, 8, 32, 32)


def test_landmark_and_parsing_masks(default_avatar, vae, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "79999_iter.pth"
    torch.save(FP.BiSeNet().state_dict(), path)
    for mode in ("jaw", "raw"):
        m = P.prepare_musetalk(default_avatar, vae, parsing=path, parsing_mode=mode)
        mask = m.masks[0]
        x1, y1, x2, y2 = m.crop_boxes[0]
        fx1, fy1, fx2, fy2 = m.face_boxes[0]
        assert mask.shape == (y2 - y1, x2 - x1) and (mask[: (fy1 + fy2) // 2 - y1] == 0).all()
        assert m.path.name.startswith("musetalk-v15-")
    lm = default_avatar.landmarks[0]
    raw = P.landmark_mask(lm, m.face_boxes[0], m.crop_boxes[0])
    pts = (lm - m.crop_boxes[0][:2]).astype(int)
    assert raw[pts[57, 1], pts[57, 0]] == 255 and raw[pts[8, 1] - 2, pts[8, 0]] == 255  # lower lip, chin
    assert raw[pts[30, 1], pts[30, 0]] == 0 and raw[pts[36, 1], pts[36, 0]] == 0  # nose tip, eye


# ---------------------------------------------------------------------------
# Hand-built avatars: frame edges, frames without a face


def test_face_partly_outside_frame(default_avatar, vae, tmp_path):
    frame, lm = default_avatar.frames[0], default_avatar.landmarks[0]
    fx1, _, fx2, _ = A.face_box_from_landmarks(lm, 0, 10)
    cut = fx1 + (fx2 - fx1) // 3
    edge = hand_avatar(tmp_path / "edge", [np.ascontiguousarray(frame[:, cut:])], [lm - (cut, 0)])
    m = P.prepare_musetalk(edge, vae)
    assert m.valid.tolist() == [True]
    x1, y1, x2, y2 = m.face_boxes[0]
    assert x1 < 0 < x2 and tuple(m.face_boxes[0]) == A.face_box_from_landmarks(lm - (cut, 0), 0, 10)
    cx1, cy1, cx2, cy2 = m.crop_boxes[0]
    w, h = edge.size
    assert 0 <= cx1 < cx2 <= w and 0 <= cy1 < cy2 <= h
    patch = m.paste(0, np.full((P.FACE_SIZE, P.FACE_SIZE, 3), 255, np.uint8))
    assert patch.image.shape[:2] == patch.mask.shape == (cy2 - cy1, cx2 - cx1)
    assert (patch.image[y1 - cy1 : y2 - cy1, : x2 - cx1] == 255).all()  # the in-frame part of the face
    assert edge.composite(0, patch).shape == edge.frames[0].shape


def test_lists_stay_aligned_with_a_faceless_frame(default_avatar, vae, tmp_path):
    frame, lm = default_avatar.frames[0], default_avatar.landmarks[0]
    shifted = np.ascontiguousarray(np.roll(frame, 12, axis=1) // 2)  # moved and darker
    blank = np.zeros_like(frame)
    hand = hand_avatar(tmp_path / "three", [frame, blank, shifted], [lm, None, lm + (12, 0)])
    assert len(hand) == 6
    counting = CountingVAE(vae)
    m = P.prepare_musetalk(hand, counting, batch_size=1)
    assert counting.calls == 2 and counting.images == 4  # the faceless frame is not encoded
    assert len(m) == 3 and m.valid.tolist() == [True, False, True]
    assert m.latents.shape == (3, 8, 32, 32) and not m.latents[1].any() and m.latents[2].any()
    assert (m.face_boxes[1] == -1).all() and (m.crop_boxes[1] == -1).all() and m.masks[1].size == 0
    assert m.face_boxes[2][0] == m.face_boxes[0][0] + 12
    assert not np.array_equal(m.latents[0], m.latents[2])
    loop = m.loop_latents(range(6)).numpy()
    for i, s in enumerate([0, 1, 2, 2, 1, 0]):
        assert np.array_equal(loop[i], m.latents[s])
    face = np.zeros((P.FACE_SIZE, P.FACE_SIZE, 3), np.uint8)
    assert m.paste(1, face) is None and m.paste(4, face) is None
    assert m.paste(3, face).box == tuple(m.crop_boxes[2]) and m.paste(6, face).box == tuple(m.crop_boxes[0])
    on = m.loop_latents([3, 1], dtype=torch.float32)
    assert on.dtype == torch.float32 and torch.equal(on[0], torch.from_numpy(m.latents[2].astype(np.float32)))
    reloaded = P.prepare_musetalk(hand, counting, batch_size=1)
    assert counting.calls == 2 and reloaded.valid.tolist() == [True, False, True]


# ---------------------------------------------------------------------------
# Real video


def test_yongen_boxes_on_the_face(vae, tmp_path):
    if not YONGEN.exists():
        pytest.skip(f"{YONGEN} not present")
    A.prepare_avatar(YONGEN, "yongen", tmp_path, max_frames=10, resize_height=480, extra_margin=10)
    av = A.load_avatar("yongen", tmp_path)
    counting = CountingVAE(vae)
    m = P.prepare_musetalk(av, counting)
    w, h = av.size
    assert len(m) == len(m.latents) == len(m.face_boxes) == len(m.crop_boxes) == len(m.masks) == 10
    assert m.valid.all() and counting.images == 20
    for s in range(10):
        x1, y1, x2, y2 = m.face_boxes[s]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        lips = av.landmarks[s][A.LIPS]
        assert (lips[:, 0] >= x1).all() and (lips[:, 0] <= x2).all()
        assert (lips[:, 1] >= y1).all() and (lips[:, 1] <= y2).all()
        cx1, cy1, cx2, cy2 = m.crop_boxes[s]
        assert cx1 <= x1 and cy1 <= y1 and x2 <= cx2 and y2 <= cy2
        assert m.masks[s].shape == (cy2 - cy1, cx2 - cx1)
        mouth = lips.mean(axis=0) - (cx1, cy1)
        assert m.masks[s][int(mouth[1]), int(mouth[0])] > 0.5
    assert np.array_equal(m.face_boxes, av.face_boxes[:10])  # same box rule as the avatar's
    calls = counting.calls
    again = P.prepare_musetalk(A.load_avatar("yongen", tmp_path), counting)
    assert counting.calls == calls and again.path == m.path


# ---------------------------------------------------------------------------
# CLI


def test_cli_prepares_from_source(default_avatar, vae, tmp_path, monkeypatch, capsys):
    source = tmp_path / "face.png"
    cv2.imwrite(str(source), default_avatar.frames[0])
    fake = types.ModuleType("musetalk.models")
    fake.find_weights = lambda models_dir, version: types.SimpleNamespace(face_parse=None)
    fake.load_vae = lambda paths, device, dtype: vae
    monkeypatch.setitem(sys.modules, "musetalk.models", fake)
    root = tmp_path / "avatars"
    args = ["--avatar_id", "cli", "--source", str(source), "--root", str(root), "--device", "cpu"]
    assert P.main(args) == 0
    out = capsys.readouterr().out
    assert "1 source frames (1 with a face)" in out and str(root / "cli" / "musetalk-v15-") in out
    assert P.main([*args, "--parsing", "jaw"]) == 1  # no parsing weights: a clear error


def test_script_entry_point_imports():
    result = subprocess.run([sys.executable, str(ROOT / "musetalk" / "prepare.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT.parent, timeout=60)
    assert result.returncode == 0 and "--avatar_id" in result.stdout
