"""MuseTalk avatar preparation: face crops, VAE latents and paste-back masks, cached.

On top of a prepared ``avatar.Avatar`` (frames, landmarks), MuseTalk needs per
SOURCE frame (the ping-pong loop reuses them through ``Avatar.source_index``):

1. the face box (MuseTalk box rule, ``avatar.face_box_from_landmarks`` with this
   version's ``bbox_shift`` / ``extra_margin``, NOT clipped to the frame) and its
   256x256 crop: edge pixels are replicated where the box leaves the frame, so the
   generated face maps back onto exactly that box;
2. the UNet's (8, 32, 32) latent input: VAE latent means of the masked crop (bottom
   128 rows at -1) in channels 0-3 and of the reference (unmasked) crop in channels
   4-7, each x VAE_SCALE (facts doc, "Image pipeline" steps 1-3);
3. the crop box (face box clipped to the frame, expanded 1.5x to a square inside
   it: ``avatar.expand_box``) and a blurred blend mask in crop-box pixels: from the
   landmarks by default (``landmark_mask``), from BiSeNet face parsing when a
   checkpoint is given (``musetalk.face_parsing.face_mask``), kept inside the face
   box below its centre row and Gaussian-blurred over MASK_BLUR x the crop width
   (``finish_mask``).

Everything is cached under ``<avatar dir>/musetalk-<version>-<key>/``, where key
hashes every input (version, box parameters, mask source, VAE identity, avatar
content)::

    latents.npy     float16 (S, 8, 32, 32), zeros where no face
    face_boxes.npy  int32 (S, 4) x1, y1, x2, y2 (may reach outside the frame), -1 rows where no face
    crop_boxes.npy  int32 (S, 4) inside the frame, -1 rows where no face
    valid.npy       bool (S,) whether the source frame has a face
    masks.npz       uint8 crop-box-sized masks "m00000", ...; (0, 0) where no face
    manifest.json   the inputs, counts and creation time

A source frame without a face keeps its slot in every array (zeros / -1 / empty),
so all lists stay aligned with the frames.

CLI (from the repository root)::

    python -m musetalk.prepare --avatar_id alice --source clip.mp4 --models_dir models [--version v15]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python musetalk/prepare.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from tqdm import tqdm

import avatar as avatar_mod
from avatar import CROP_SCALE, Avatar, FacePatch, expand_box, face_box_from_landmarks
from musetalk.face_parsing import MASK_MODES, face_mask, load_face_parser
from musetalk.inference import VAE_SCALE

log = logging.getLogger("musetalk.prepare")

FORMAT_VERSION = 1  # bump when the cache layout or the preparation pipeline changes
FILES = ("latents.npy", "face_boxes.npy", "crop_boxes.npy", "valid.npy", "masks.npz")  # + manifest.json
FACE_SIZE = 256  # MuseTalk's face crop side (pixels); the VAE makes 32x32 latents of it
# Per-version defaults (MuseTalk README / inference configs): v1.5 adds 10 px below
# the chin and blends with the "jaw" parsing mask; v1.0 uses neither.
VERSIONS = {"v15": {"extra_margin": 10, "parsing_mode": "jaw"}, "v1": {"extra_margin": 0, "parsing_mode": "raw"}}
MASK_BLUR = 0.1  # Gaussian blur kernel, fraction of the crop-box width (MuseTalk blending)
# Landmark mask (iBUG 68 indices; our choice of proportions): the lower face
# between jaw points 2..14, from a line NOSE_GAP x the nose length (29 -> 33) below
# the nose (33) down to the jaw, reaching CHIN_DROP x the face-box height below the
# jaw line for a chin that drops as the mouth opens.
JAW = slice(2, 15)
NOSE_BRIDGE, NOSE_BOTTOM = 29, 33
NOSE_GAP = 0.2
CHIN_DROP = 0.08
HASH_STRIDE = 8  # the avatar identity hashes every 8th pixel of each source frame


# ---------------------------------------------------------------------------
# Crops, latents, masks


def crop_face(frame: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The face box of ``frame`` resized to FACE_SIZE x FACE_SIZE (Lanczos).

    frame: uint8 (H, W, 3) BGR. box: (x1, y1, x2, y2) in frame pixels, may reach
    outside the frame: the missing part is filled by replicating the edge pixels
    (the box is never shifted). Returns uint8 (FACE_SIZE, FACE_SIZE, 3) BGR.
    Raises ValueError for an empty box or one that does not overlap the frame.
    """
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1 or cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"face box {box} is empty or outside the {w}x{h} frame")
    region = frame[cy1:cy2, cx1:cx2]
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        region = cv2.copyMakeBorder(region, cy1 - y1, y2 - cy2, cx1 - x1, x2 - cx2, cv2.BORDER_REPLICATE)
    return cv2.resize(region, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


def vae_inputs(crops: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, reference) VAE inputs of face crops.

    crops: B uint8 (FACE_SIZE, FACE_SIZE, 3) BGR crops (``crop_face``). Returns two
    float32 (B, 3, FACE_SIZE, FACE_SIZE) RGB tensors in [-1, 1] on the CPU; in the
    masked one the bottom FACE_SIZE // 2 rows are -1 (black before normalisation).
    """
    rgb = np.stack(crops)[..., ::-1]
    reference = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    masked = reference.clone()
    masked[:, :, FACE_SIZE // 2 :] = -1
    return masked, reference


@torch.no_grad()
def encode_latents(vae, crops: Sequence[np.ndarray]) -> np.ndarray:
    """UNet latent inputs of face crops: one VAE encode call for the whole batch.

    vae: a diffusers ``AutoencoderKL`` (inputs go to its device and dtype).
    crops: B uint8 BGR face crops. Returns float32 (B, 2 * latent channels, 32, 32)
    (8 for the SD VAE): latent means x VAE_SCALE of the masked crops (channels
    0-3), then of the reference crops (channels 4-7).
    """
    masked, reference = vae_inputs(crops)
    x = torch.cat([masked, reference]).to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean.float() * VAE_SCALE
    return torch.cat(latents.chunk(2), dim=1).cpu().numpy()


def landmark_mask(lm: np.ndarray, face_box: Sequence[int], crop_box: Sequence[int]) -> np.ndarray:
    """Lower-face blend mask from iBUG 68 landmarks (before ``finish_mask``).

    lm: float (68, 2) frame pixels. The polygon of jaw points 2..14 closed by a
    horizontal line NOSE_GAP x the nose length below landmark 33, extended
    CHIN_DROP x the face-box height downward; rows above that line are cleared.
    Covers mouth, chin and lower cheeks. Returns uint8 (h, w) in crop-box pixels
    (crop_box (x1, y1, x2, y2)), 255 inside.
    """
    cx1, cy1, cx2, cy2 = crop_box
    pts = lm.astype(np.float64) - (cx1, cy1)
    top = pts[NOSE_BOTTOM, 1] + NOSE_GAP * (pts[NOSE_BOTTOM, 1] - pts[NOSE_BRIDGE, 1])
    jaw = pts[JAW]
    polygon = np.vstack([jaw, [[jaw[-1, 0], top], [jaw[0, 0], top]]])
    mask = np.zeros((cy2 - cy1, cx2 - cx1), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 255)
    drop = max(1, round(CHIN_DROP * (face_box[3] - face_box[1])))
    mask = cv2.dilate(mask, np.ones((drop + 1, 1), np.uint8), anchor=(0, drop))
    mask[: max(int(np.ceil(top)), 0)] = 0
    return mask


def finish_mask(mask: np.ndarray, face_box: Sequence[int], crop_box: Sequence[int]) -> np.ndarray:
    """MuseTalk's gating and blur of a raw blend mask, in crop-box pixels.

    mask: uint8 (h, w) crop-box-sized. Keeps it only inside the face box and in
    the generated lower half, then Gaussian-blurs it with an odd kernel of about
    MASK_BLUR x the crop width (k pixels). The lower half starts k // 2 rows below
    the face box's centre row, so the blurred mask is exactly 0 above the centre
    (the eyes and nose bridge always stay original). Returns uint8 (h, w).
    """
    cx1, cy1, cx2, cy2 = crop_box
    fx1, fy1, fx2, fy2 = face_box
    h, w = mask.shape
    k = 2 * round(MASK_BLUR * w / 2) + 1
    gate = np.zeros_like(mask)
    top = max((fy1 + fy2) // 2 - cy1 + k // 2, 0)
    x1, x2, y2 = max(fx1 - cx1, 0), min(fx2 - cx1, w), min(fy2 - cy1, h)
    gate[top:y2, x1:x2] = mask[top:y2, x1:x2]
    return cv2.GaussianBlur(gate, (k, k), 0)


# ---------------------------------------------------------------------------
# The prepared avatar


@dataclass
class MuseTalkAvatar:
    """MuseTalk's per-source-frame data for one ``avatar.Avatar`` (see ``prepare_musetalk``).

    avatar: the Avatar (frames, ping-pong loop). latents: float16 (S, 8, 32, 32)
    UNet latent inputs, masked then reference (zeros where no face). face_boxes:
    int32 (S, 4) MuseTalk face boxes in frame pixels, may reach outside the frame.
    crop_boxes: int32 (S, 4) paste-back regions inside the frame. masks: S float32
    (h, w) blend masks in [0, 1] at crop-box size ((0, 0) where no face). valid:
    bool (S,) whether the source frame has a face. S = number of source frames;
    loop index i uses source frame ``avatar.source_index(i)``. path: the cache dir.
    """

    avatar: Avatar
    latents: np.ndarray
    face_boxes: np.ndarray
    crop_boxes: np.ndarray
    masks: list[np.ndarray]
    valid: np.ndarray
    path: Path
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _paste: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Paste geometry per source frame: the resized face's size and interpolation,
        # and the slices that put its in-frame part into the crop box.
        for s, ok in enumerate(self.valid):
            if not ok:
                self._paste.append(None)
                continue
            fx1, fy1, fx2, fy2 = (int(v) for v in self.face_boxes[s])
            cx1, cy1, cx2, cy2 = (int(v) for v in self.crop_boxes[s])
            ix1, iy1, ix2, iy2 = max(fx1, cx1), max(fy1, cy1), min(fx2, cx2), min(fy2, cy2)
            size = (fx2 - fx1, fy2 - fy1)
            interp = cv2.INTER_AREA if max(size) < FACE_SIZE else cv2.INTER_LINEAR
            src = (slice(iy1 - fy1, iy2 - fy1), slice(ix1 - fx1, ix2 - fx1))
            dst = (slice(iy1 - cy1, iy2 - cy1), slice(ix1 - cx1, ix2 - cx1))
            region = self.avatar.frames[s][cy1:cy2, cx1:cx2]
            self._paste.append((size, interp, src, dst, region, (cx1, cy1, cx2, cy2)))

    def __len__(self) -> int:
        return len(self.valid)

    def loop_latents(self, indices: Sequence[int], device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """UNet latent inputs of loop frames: (B, 8, 32, 32) for B loop indices.

        Indices wrap and map to source frames via ``avatar.source_index``. Returns
        a ``dtype`` (default float16) tensor on ``device`` (default CPU). On an
        accelerator the latents of all source frames are copied there once and
        indexed there, so a batch costs no host-to-device copy of latents; on the
        CPU they are gathered with numpy (on a busy machine a small torch CPU op
        can wait milliseconds for its thread pool; numpy takes microseconds).
        """
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float16
        src = [self.avatar.source_index(i) for i in indices]
        if device.type == "cpu":
            np_dtype = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype)
            if np_dtype is not None:
                return torch.from_numpy(self.latents[src].astype(np_dtype, copy=False))
            return torch.from_numpy(self.latents[src]).to(dtype)
        table = self._on_device.get((device, dtype))
        if table is None:
            table = self._on_device[(device, dtype)] = torch.from_numpy(self.latents).to(device, dtype)
        return table.index_select(0, torch.tensor(src, device=device))

    def paste(self, loop_index: int, face_bgr_256: np.ndarray) -> FacePatch | None:
        """A generated face as a patch for ``avatar.composite(loop_index, patch)``.

        face_bgr_256: uint8 (FACE_SIZE, FACE_SIZE, 3) BGR face for the face box of
        loop frame ``loop_index``. It is resized to the face box and placed (its
        in-frame part) into a copy of the original frame's crop-box region.
        Returns FacePatch(image uint8 (h, w, 3), box = crop box, mask float32 (h, w)),
        sizes equal so compositing resizes nothing; None when the frame has no face.
        """
        s = self.avatar.source_index(loop_index)
        geometry = self._paste[s]
        if geometry is None:
            return None
        size, interp, src, dst, region, box = geometry
        patch = region.copy()
        patch[dst] = cv2.resize(face_bgr_256, size, interpolation=interp)[src]
        return FacePatch(patch, box, self.masks[s])


# ---------------------------------------------------------------------------
# Cache


def _version_defaults(version: str, extra_margin: int | None, parsing_mode: str | None) -> tuple[int, str]:
    if version not in VERSIONS:
        raise ValueError(f"unknown MuseTalk version {version!r}: use one of {sorted(VERSIONS)}")
    defaults = VERSIONS[version]
    extra_margin = defaults["extra_margin"] if extra_margin is None else int(extra_margin)
    parsing_mode = parsing_mode or defaults["parsing_mode"]
    if parsing_mode not in MASK_MODES:
        raise ValueError(f"unknown parsing mode {parsing_mode!r}: use one of {MASK_MODES}")
    return extra_margin, parsing_mode


def vae_identity(vae) -> str:
    """Hex digest identifying what a VAE's encoder computes: its config (public keys)
    and the float32 bytes of the encoder's first and last convolutions and
    ``quant_conv`` (a changed encoder changes these; fine-tuned decoders such as
    sd-vae-ft-mse vs -ema share the encoder and give identical latents).

    A VAE whose encoder has no ``conv_in`` (another class, e.g. diffusers'
    ``AutoencoderTiny``) is identified by its class name and every encoder
    parameter instead. ``musetalk.models.DecoderSwapVAE`` (SD encoder + distilled
    decoder) has the SD VAE's identity: its latents are the SD VAE's."""
    h = hashlib.sha1(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
                                sort_keys=True, default=str).encode())
    if not hasattr(vae.encoder, "conv_in"):
        h.update(type(vae).__name__.encode())
        for name, tensor in vae.encoder.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()
    for module in (vae.encoder.conv_in, vae.encoder.conv_out, getattr(vae, "quant_conv", None)):
        if module is not None:
            h.update(module.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _source_count(avatar: Avatar) -> int:
    """Number of source frames behind the ping-pong loop (L = 2S, or 1 for a still)."""
    return (len(avatar) + 1) // 2


def avatar_identity(avatar: Avatar) -> str:
    """Hex digest of an avatar's source frames (every HASH_STRIDE-th pixel) and landmarks."""
    h = hashlib.sha1()
    s = _source_count(avatar)
    h.update(np.ascontiguousarray(avatar.landmarks[:s], dtype=np.float32).tobytes())
    for frame in avatar.frames[:s]:
        h.update(str(frame.shape).encode())
        h.update(np.ascontiguousarray(frame[::HASH_STRIDE, ::HASH_STRIDE]).tobytes())
    return h.hexdigest()


def _inputs(avatar, vae, version, bbox_shift, extra_margin, parsing, parsing_mode) -> dict:
    """Everything the cached data depends on (the manifest key)."""
    parser = None
    if parsing is not None:
        p = Path(parsing).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"face-parsing weights not found: {p}")
        st = p.stat()
        parser = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": parsing_mode}
    return {"format": FORMAT_VERSION, "version": version, "bbox_shift": int(bbox_shift),
            "extra_margin": extra_margin, "mask": "parsing" if parser else "landmarks", "parser": parser,
            "vae": vae_identity(vae), "avatar": avatar_identity(avatar)}


def _cache_dir(avatar: Avatar, version: str, inputs: dict) -> Path:
    key = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]
    return Path(avatar.path) / f"musetalk-{version}-{key}"


def _is_cached(path: Path, inputs: dict) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == v for k, v in inputs.items()) and all((path / f).is_file() for f in FILES)


def _build(out, avatar, vae, inputs, bbox_shift, extra_margin, parsing, parsing_mode, batch_size, device) -> None:
    """Compute boxes, latents and masks of every source frame; write them to ``out``."""
    s_count = _source_count(avatar)
    frame_size = avatar.size
    frames, landmarks = avatar.frames[:s_count], avatar.landmarks[:s_count]
    parser = None if parsing is None else load_face_parser(parsing, device or vae.device)
    face_boxes = np.full((s_count, 4), -1, np.int32)
    crop_boxes = np.full((s_count, 4), -1, np.int32)
    valid = np.zeros(s_count, bool)
    for s, lm in enumerate(landmarks):
        if not np.isfinite(lm).all():
            continue
        box = face_box_from_landmarks(lm, bbox_shift, extra_margin)
        x1, y1, x2, y2 = box
        w, h = frame_size
        if x2 <= x1 or y2 <= y1 or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            log.warning("source frame %d: face box %s is empty or outside the frame (bbox_shift %d?); skipped",
                        s, box, bbox_shift)
            continue
        face_boxes[s] = box
        crop_boxes[s] = expand_box((max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)), CROP_SCALE, frame_size)
        valid[s] = True
    latents = None
    masks: dict[str, np.ndarray] = {f"m{s:05d}": np.zeros((0, 0), np.uint8) for s in range(s_count)}
    todo = np.flatnonzero(valid)
    with tqdm(total=len(todo), desc=f"musetalk {out.name}", unit="frame") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            z = encode_latents(vae, [crop_face(frames[s], face_boxes[s]) for s in batch])
            if latents is None:
                latents = np.zeros((s_count, *z.shape[1:]), np.float16)
            latents[batch] = z
            for s in batch:
                fb, cb = tuple(face_boxes[s]), tuple(crop_boxes[s])
                if parser is None:
                    raw = landmark_mask(landmarks[s], fb, cb)
                else:
                    classes = parser.parse(frames[s][cb[1] : cb[3], cb[0] : cb[2]])
                    raw = face_mask(classes, parsing_mode, centre_x=(fb[0] + fb[2]) / 2 - cb[0])
                masks[f"m{s:05d}"] = finish_mask(raw, fb, cb)
            bar.update(len(batch))
    if latents is None:
        raise ValueError(f"avatar {avatar.avatar_id!r}: no source frame has a usable face box")
    Path(avatar.path).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=avatar.path))
    try:
        tmp.chmod(0o755)
        np.save(tmp / "latents.npy", latents)
        np.save(tmp / "face_boxes.npy", face_boxes)
        np.save(tmp / "crop_boxes.npy", crop_boxes)
        np.save(tmp / "valid.npy", valid)
        np.savez_compressed(tmp / "masks.npz", **masks)
        manifest = {**inputs, "source_frames": s_count, "valid_frames": int(valid.sum()),
                    "frame_size": list(frame_size), "latent_shape": list(latents.shape[1:]),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        avatar_mod.publish_atomically(tmp, out, lambda p: _is_cached(p, inputs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(avatar: Avatar, path: Path) -> MuseTalkAvatar:
    valid = np.load(path / "valid.npy")
    with np.load(path / "masks.npz") as z:
        masks = [z[f"m{s:05d}"].astype(np.float32) / 255 for s in range(len(valid))]
    return MuseTalkAvatar(avatar, np.load(path / "latents.npy"), np.load(path / "face_boxes.npy"),
                          np.load(path / "crop_boxes.npy"), masks, valid, path)


def load_musetalk_avatar(
    avatar: Avatar,
    vae,
    version: str = "v15",
    bbox_shift: int = 0,
    extra_margin: int | None = None,
    parsing: str | Path | None = None,
    parsing_mode: str | None = None,
) -> MuseTalkAvatar:
    """Load the cached MuseTalk data of ``avatar`` for these inputs (see ``prepare_musetalk``).

    Raises FileNotFoundError when it has not been prepared with exactly these
    inputs (or the parsing checkpoint is missing), ValueError for an unknown
    version or parsing mode.
    """
    extra_margin, parsing_mode = _version_defaults(version, extra_margin, parsing_mode)
    inputs = _inputs(avatar, vae, version, bbox_shift, extra_margin, parsing, parsing_mode)
    path = _cache_dir(avatar, version, inputs)
    if not _is_cached(path, inputs):
        raise FileNotFoundError(
            f"no MuseTalk {version} data for avatar {avatar.avatar_id!r} with these inputs at {path}; "
            f"prepare it with: python -m musetalk.prepare --avatar_id {avatar.avatar_id} --version {version}"
        )
    return _load(avatar, path)


def prepare_musetalk(
    avatar: Avatar,
    vae,
    version: str = "v15",
    bbox_shift: int = 0,
    extra_margin: int | None = None,
    parsing: str | Path | None = None,
    parsing_mode: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> MuseTalkAvatar:
    """Prepare (or reuse from the cache) MuseTalk's per-frame data for ``avatar``.

    vae: diffusers ``AutoencoderKL`` (sd-vae-ft-mse; any device/dtype, encoder in
    eval mode). version: "v15" or "v1". bbox_shift: face-box centre shift in
    pixels (v1.0; v1.5 was trained with 0). extra_margin: pixels added below the
    chin (None: 10 for v15, 0 for v1). parsing: path of the BiSeNet checkpoint
    (``79999_iter.pth``) for face-parsing blend masks; None: masks from the
    landmarks. parsing_mode: "jaw" or "raw" (None: jaw for v15, raw for v1).
    batch_size: frames per VAE encode call (each call encodes 2 x batch_size
    crops). device: where the face parser runs (default: the VAE's device).

    The cache (``<avatar.path>/musetalk-<version>-<key>/``) is reused when every
    input (parameters, VAE encoder identity, avatar frames and landmarks, parser
    file) matches; other inputs build another directory, atomically. Raises
    ValueError for an unknown version or parsing mode, or when no frame has a
    usable face box; FileNotFoundError for a missing parsing checkpoint.
    """
    extra_margin, parsing_mode = _version_defaults(version, extra_margin, parsing_mode)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = _inputs(avatar, vae, version, bbox_shift, extra_margin, parsing, parsing_mode)
    path = _cache_dir(avatar, version, inputs)
    if _is_cached(path, inputs):
        log.info("musetalk avatar %r: inputs unchanged, reusing cache at %s", avatar.avatar_id, path)
    else:
        _build(path, avatar, vae, inputs, bbox_shift, extra_margin, parsing, parsing_mode, batch_size, device)
        log.info("musetalk avatar %r: %s data written to %s", avatar.avatar_id, version, path)
    return _load(avatar, path)


# ---------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description="Prepare an avatar for MuseTalk: crops, VAE latents, blend masks.")
    parser.add_argument("--avatar_id", required=True, help="avatar directory under --root")
    parser.add_argument("--source", type=Path, help="image or video: (re)prepare the avatar from it first")
    parser.add_argument("--root", type=Path, default=avatar_mod.DEFAULT_ROOT, help="avatar cache directory")
    parser.add_argument("--models_dir", type=Path, default=Path("models"), help="MuseTalk weights folder")
    parser.add_argument("--version", default="v15", choices=sorted(VERSIONS), help="MuseTalk weights version")
    parser.add_argument("--bbox_shift", type=int, default=0, help="face-box centre shift, pixels (v1.0)")
    parser.add_argument("--extra_margin", type=int, help="pixels below the chin (default 10 for v15, 0 for v1)")
    parser.add_argument("--parsing", choices=[*MASK_MODES, "landmarks"],
                        help="blend mask: face parsing (jaw/raw) or landmarks; default: the version's "
                             "parsing mode when models_dir has the BiSeNet weights, else landmarks")
    parser.add_argument("--max_frames", type=int, help="with --source: use only the first N frames")
    parser.add_argument("--resize_height", type=int, help="with --source: scale frames to this height")
    parser.add_argument("--batch_size", type=int, default=8, help="frames per VAE encode call")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from musetalk.models import find_weights, load_vae

    extra_margin, default_mode = _version_defaults(args.version, args.extra_margin, None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        if args.source is not None:
            avatar_mod.prepare_avatar(args.source, args.avatar_id, args.root, args.max_frames,
                                      args.resize_height, args.bbox_shift, extra_margin)
        avatar = avatar_mod.load_avatar(args.avatar_id, args.root)
        weights = find_weights(args.models_dir, args.version)
        parsing, mode = None, args.parsing or default_mode
        if args.parsing != "landmarks":
            parsing = weights.face_parse
            if parsing is None and args.parsing is not None:
                raise FileNotFoundError(f"--parsing {args.parsing} needs {args.models_dir}/face-parse-bisent/"
                                        "79999_iter.pth (scripts/download_weights.sh), or use --parsing landmarks")
            if parsing is None:
                log.info("no face-parsing weights in %s: blend masks from landmarks", args.models_dir)
        vae = load_vae(weights, device, dtype)
        result = prepare_musetalk(avatar, vae, args.version, args.bbox_shift, extra_margin, parsing,
                                  mode, args.batch_size, device)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    print(f"avatar {args.avatar_id!r}: MuseTalk {args.version} data for {len(result)} source frames "
          f"({int(result.valid.sum())} with a face) in {result.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
