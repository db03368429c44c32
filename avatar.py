"""Avatar preparation and the in-memory avatar shared by every lip-sync model.

An avatar is a loop of BGR frames of one person plus per-frame face landmarks in
the iBUG 300-W 68-point scheme (0-based; 29 = nose bridge, 48-67 = lips), found
with dlib's HOG face detector and the 68-point shape predictor shipped by
``face_recognition_models``. Preparation (the slow part: face detection) runs once
per source and is cached under ``<root>/<avatar_id>/``::

    frames/00000.jpg ...   the source frames (not the reversed half of the loop)
    landmarks.npy          float32 (N, 68, 2), NaN rows for frames with no face
    manifest.json          source path/size/mtime, parameters, frame count/size, fps

Loading builds the ping-pong loop (frames + reversed frames, as MuseTalk does) and
the face, crop and mouth boxes from the cached landmarks. A frame with no face
keeps its slot in every per-frame array, so the arrays never drift out of step.

All boxes are half-open pixel boxes ``(x1, y1, x2, y2)``: the region is
``frame[y1:y2, x1:x2]``.

CLI::

    python avatar.py prepare --source clip.mp4 --avatar_id alice [--resize_height 720]
    python avatar.py list
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from clock import VIDEO_FPS

log = logging.getLogger("avatar")


def to_i420(frame_bgr: np.ndarray) -> np.ndarray:
    """BGR uint8 (H, W, 3) -> I420 (yuv420p) planes, uint8 (H * 3 // 2, W); H, W even.

    OpenCV's conversion is BT.601 limited range like libswscale's (within one level)
    but ~20x faster and releases the GIL, so it does not stall the event loop.
    """
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2YUV_I420)

FORMAT_VERSION = 1  # bump when the cache layout or the landmark pipeline changes
DEFAULT_ROOT = Path("data/avatars")
DEFAULT_AVATAR_ID = "default"
# Frames are cached as JPEG quality 95: ~6x smaller and ~3x faster to load than PNG.
FRAME_NAME, FRAME_PARAMS = "{:05d}.jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

# iBUG 68-point indices (0-based).
NOSE_BRIDGE = 29  # MuseTalk box rule: the face box is centred vertically here
LIPS = slice(48, 68)  # outer (48-59) and inner (60-67) lip contours

CROP_SCALE = 1.5  # MuseTalk blending crop: face box expanded 1.5x to a square
MOUTH_MARGIN = 0.1  # mouth box margin on every side, as a fraction of the lip width

# Detection speed: full-frame detection runs on a copy whose longer side is at most
# DETECT_MAX_SIDE, upsampled once (faces down to ~40 px of that copy are found).
# Tracking (FaceTracker) confirms the face in a region CHECK_REGION times its size,
# scaled so the face is ~CHECK_FACE_PX wide (dlib's HOG window is 80 px).
DETECT_MAX_SIDE = 640
CHECK_REGION = 2.5
CHECK_FACE_PX = 120
SIMILAR_FACE_AREA = 0.8  # faces within this area ratio of the largest compete on score

# Default avatar: the scikit-image astronaut (public domain, NASA), cropped to a
# square DEFAULT_FACE_SCALE times the face box and resized to DEFAULT_SIZE.
DEFAULT_SOURCE = "skimage.data.astronaut()"
DEFAULT_FACE_SCALE = 2.0
DEFAULT_SIZE = 512

Box = tuple[int, int, int, int]


@dataclass
class FacePatch:
    """A generated face region to paste into an avatar frame.

    image: uint8 (h, w, 3) BGR. box: (x1, y1, x2, y2) in frame pixels; may reach
    outside the frame (the outside part is dropped). mask: float32 (h, w) in [0, 1],
    1 = take the patch; None means all ones. An image (and mask) whose size differs
    from the box is resized to it when composited.
    """

    image: np.ndarray
    box: Box
    mask: np.ndarray | None = None


@dataclass
class Avatar:
    """One prepared avatar in memory (see ``load_avatar``).

    frames: the ping-pong loop, BGR uint8 (H, W, 3), all one size; for a video of
    N > 1 frames the loop is frames + frames[::-1] (length 2N, the reversed half
    shares the arrays), for a still image a loop of 1. Never write into them.
    landmarks: float32 (L, 68, 2) iBUG 68-point (x, y) per loop frame, NaN rows where
    no face was found. face_boxes: int32 (L, 4), MuseTalk box rule (see
    ``face_box_from_landmarks``). crop_boxes: int32 (L, 4), the face box expanded
    1.5x to a square inside the frame (``expand_box``). mouth_boxes: int32 (L, 4),
    lips with a margin (``mouth_box_from_landmarks``). Box arrays have -1 rows where
    no face was found. fps: frame rate of the source (the server plays the loop at
    ``clock.VIDEO_FPS``).
    """

    avatar_id: str
    path: Path
    frames: list[np.ndarray]
    landmarks: np.ndarray
    face_boxes: np.ndarray
    crop_boxes: np.ndarray
    mouth_boxes: np.ndarray
    fps: int = VIDEO_FPS
    _i420: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, i: int) -> np.ndarray:
        """Loop frame ``i`` (wraps modulo the loop length)."""
        return self.frames[i % len(self.frames)]

    @property
    def size(self) -> tuple[int, int]:
        """Frame size (width, height) in pixels."""
        h, w = self.frames[0].shape[:2]
        return w, h

    def frame_i420(self, i: int) -> np.ndarray:
        """Loop frame ``i`` as I420 (yuv420p) planes, uint8 (H * 3 // 2, W); cached per source frame."""
        key = self.source_index(i)
        planes = self._i420.get(key)
        if planes is None:
            planes = self._i420[key] = to_i420(self.frame(i))
        return planes

    def source_index(self, i: int) -> int:
        """Index of the source frame shown at loop index ``i`` (for per-source caches)."""
        i %= len(self.frames)
        return min(i, len(self.frames) - 1 - i)

    def composite(self, i: int, patch: FacePatch | None) -> np.ndarray:
        """Loop frame ``i`` with ``patch`` alpha-blended into it by its mask.

        Returns the loop frame itself when ``patch`` is None or lies wholly outside
        the frame, else a new uint8 (H, W, 3) frame; the part of the patch outside
        the frame is dropped.
        """
        frame = self.frame(i)
        if patch is None:
            return frame
        x1, y1, x2, y2 = (int(v) for v in patch.box)
        image, mask = patch.image, patch.mask
        if image.shape[:2] != (y2 - y1, x2 - x1):
            if x2 <= x1 or y2 <= y1:
                return frame
            image = cv2.resize(image, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
            if mask is not None:
                mask = cv2.resize(mask, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        h, w = frame.shape[:2]
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if cx1 >= cx2 or cy1 >= cy2:
            return frame
        out = frame.copy()
        src = image[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        dst = out[cy1:cy2, cx1:cx2]
        if mask is None:
            dst[:] = src
        else:
            alpha = np.ascontiguousarray(mask[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1], dtype=np.float32)
            dst[:] = cv2.blendLinear(np.ascontiguousarray(src), np.ascontiguousarray(dst), alpha, 1.0 - alpha)
        return out


# ---------------------------------------------------------------------------
# Landmarks and boxes (public: MuseTalk's preparation reuses them)


def _predictor_path() -> Path:
    """``shape_predictor_68_face_landmarks.dat`` inside ``face_recognition_models``.

    Located from the package directory: the package's own
    ``pose_predictor_model_location()`` imports ``pkg_resources``, which current
    setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face landmarks need face_recognition_models: pip install face-recognition-models")
    return Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"


@lru_cache(maxsize=1)
def _dlib_models():
    """(HOG frontal face detector, 68-point shape predictor), loaded once (~1 s)."""
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(_predictor_path()))


def _faces(rgb: np.ndarray, upsample: int) -> list[tuple[float, tuple[int, int, int, int]]]:
    """(score, (left, top, right, bottom)) of every face dlib's HOG detector finds."""
    detector, _ = _dlib_models()
    rects, scores, _ = detector.run(rgb, upsample)
    return [(s, (r.left(), r.top(), r.right(), r.bottom())) for s, r in zip(scores, rects)]


def _find_face(rgb: np.ndarray) -> tuple[float, float, float, float] | None:
    """Detector rectangle (frame pixels) of the main face: the largest, and among faces
    of similar area the best scored (the astronaut has a false positive lower down
    nearly as large as her face but scoring far lower)."""
    f = min(1.0, DETECT_MAX_SIDE / max(rgb.shape[:2]))
    small = rgb if f == 1.0 else cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    faces = _faces(small, 1)
    if not faces:
        return None
    area = [(r[2] - r[0]) * (r[3] - r[1]) for _, r in faces]
    similar = [sr for sr, a in zip(faces, area) if a >= SIMILAR_FACE_AREA * max(area)]
    _, best = max(similar, key=lambda sr: sr[0])
    return tuple(v / f for v in best)


def _shape(rgb: np.ndarray, rect) -> np.ndarray:
    """float32 (68, 2) shape-predictor landmarks for a detector-like rectangle."""
    import dlib

    _, predictor = _dlib_models()
    shape = predictor(rgb, dlib.rectangle(*(int(round(v)) for v in rect)))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def detect_landmarks(frame_bgr: np.ndarray) -> np.ndarray | None:
    """iBUG 68-point landmarks of the main (largest) face in one frame.

    frame_bgr: uint8 (H, W, 3) BGR. Returns float32 (68, 2) (x, y) in frame pixels,
    or None when no face is found. ~20-100 ms (detection); for consecutive video
    frames use ``FaceTracker``.
    """
    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    rect = _find_face(rgb)
    return None if rect is None else _shape(rgb, rect)


def _centre_scale(lm: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroid (2,) and RMS distance from it of a landmark set."""
    centre = lm.mean(axis=0)
    return centre, float(np.sqrt(((lm - centre) ** 2).sum(axis=1).mean()))


class FaceTracker:
    """iBUG 68-point landmarks for consecutive frames of one video (~10 ms a frame).

    The first frame, and any frame after the face was lost, runs full detection
    (``detect_landmarks``). Later frames give the shape predictor the rectangle the
    detector drew, kept in place relative to the previous frame's landmarks (moved
    and scaled with them): the HOG detector's box sizes are coarse and make
    landmarks jump from frame to frame, the tracked rectangle does not. A detection
    in a small region around the face confirms each frame still shows it.
    Call with each BGR uint8 (H, W, 3) frame in order; returns float32 (68, 2) or None.
    """

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None  # landmarks of the previous frame
        self._anchor = (np.zeros(2), 0.0)  # detector rect centre offset and side, in landmark scales

    def __call__(self, frame_bgr: np.ndarray) -> np.ndarray | None:
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        if self._prev is not None:
            centre, scale = _centre_scale(self._prev)
            offset, side = self._anchor
            c = centre + offset * scale
            half = side * scale / 2
            rect = (c[0] - half, c[1] - half, c[0] + half, c[1] + half)
            if self._face_near(rgb, rect):
                self._prev = _shape(rgb, rect)
                return self._prev
        rect = _find_face(rgb)
        if rect is None:
            self._prev = None
            return None
        self._prev = _shape(rgb, rect)
        centre, scale = _centre_scale(self._prev)
        rect_centre = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
        self._anchor = ((rect_centre - centre) / scale, (rect[2] - rect[0]) / scale)
        return self._prev

    @staticmethod
    def _face_near(rgb: np.ndarray, rect) -> bool:
        """Whether the detector finds a face centred inside ``rect`` in a region around it."""
        h, w = rgb.shape[:2]
        x1, y1, x2, y2 = rect
        side = x2 - x1
        half = side * CHECK_REGION / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        rx1, ry1 = max(int(cx - half), 0), max(int(cy - half), 0)
        rx2, ry2 = min(int(cx + half), w), min(int(cy + half), h)
        if side <= 0 or rx2 <= rx1 or ry2 <= ry1:
            return False
        f = CHECK_FACE_PX / side
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        roi = cv2.resize(rgb[ry1:ry2, rx1:rx2], None, fx=f, fy=f, interpolation=interp)
        for _, (l, t, r, b) in _faces(roi, 0):
            fx, fy = (l + r) / 2 / f + rx1, (t + b) / 2 / f + ry1
            if x1 <= fx <= x2 and y1 <= fy <= y2:
                return True
        return False


def _clamp(box, frame_size: tuple[int, int] | None) -> Box:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    if frame_size is not None:
        w, h = frame_size
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    return x1, y1, x2, y2


def face_box_from_landmarks(
    lm: np.ndarray, bbox_shift: int = 0, extra_margin: int = 0, frame_size: tuple[int, int] | None = None
) -> Box:
    """MuseTalk's face box from iBUG 68 landmarks.

    lm: (68, 2) (x, y). The box is centred vertically at the nose bridge (landmark
    29) moved down by ``bbox_shift`` pixels (MuseTalk v1.0; v1.5 uses 0):
    c = y29 + bbox_shift, box = (min x, c - (max y - c), max x, max y + extra_margin)
    (``extra_margin``: v1.5 adds 10 px below the chin). Rounded to ints and, when
    ``frame_size`` (width, height) is given, clipped to the frame.
    """
    xs, ys = lm[:, 0], lm[:, 1]
    centre = ys[NOSE_BRIDGE] + bbox_shift
    bottom = ys.max()
    return _clamp((xs.min(), 2 * centre - bottom, xs.max(), bottom + extra_margin), frame_size)


def mouth_box_from_landmarks(lm: np.ndarray, frame_size: tuple[int, int] | None = None) -> Box:
    """Box around the lips (iBUG landmarks 48-67) with a margin of MOUTH_MARGIN x lip
    width on every side; clipped to ``frame_size`` (width, height) when given."""
    lips = lm[LIPS]
    (x1, y1), (x2, y2) = lips.min(axis=0), lips.max(axis=0)
    m = MOUTH_MARGIN * (x2 - x1)
    return _clamp((x1 - m, y1 - m, x2 + m, y2 + m), frame_size)


def expand_box(box: Box, scale: float, frame_size: tuple[int, int]) -> Box:
    """Square of side ``scale`` x the longer side of ``box``, centred on it, moved
    (not cut) to lie inside the frame; only a square larger than the frame is cut.

    MuseTalk blends over the face box expanded 1.5x this way (``CROP_SCALE``).
    frame_size: (width, height). Returns int (x1, y1, x2, y2).
    """
    w, h = frame_size
    x1, y1, x2, y2 = box
    side = int(round(max(x2 - x1, y2 - y1) * scale))
    sw, sh = min(side, w), min(side, h)
    nx1 = min(max(int(round((x1 + x2 - sw) / 2)), 0), w - sw)
    ny1 = min(max(int(round((y1 + y2 - sh) / 2)), 0), h - sh)
    return nx1, ny1, nx1 + sw, ny1 + sh


def _boxes(landmarks: np.ndarray, bbox_shift: int, extra_margin: int, frame_size: tuple[int, int]):
    """(face, crop, mouth) int32 (N, 4) box arrays for (N, 68, 2) landmarks; -1 rows for NaN."""
    face, crop, mouth = (np.full((len(landmarks), 4), -1, np.int32) for _ in range(3))
    for k, lm in enumerate(landmarks):
        if np.isfinite(lm).all():
            face[k] = face_box_from_landmarks(lm, bbox_shift, extra_margin, frame_size)
            crop[k] = expand_box(tuple(face[k]), CROP_SCALE, frame_size)
            mouth[k] = mouth_box_from_landmarks(lm, frame_size)
    return face, crop, mouth


# ---------------------------------------------------------------------------
# Reading sources


def _open_video(path: Path) -> tuple[float, int, Iterator[np.ndarray]]:
    """(fps, frame count or 0 if unknown, BGR frame iterator) via OpenCV, else PyAV."""
    cap = cv2.VideoCapture(str(path))
    ok, first = cap.read() if cap.isOpened() else (False, None)
    if ok:
        fps = cap.get(cv2.CAP_PROP_FPS) or float(VIDEO_FPS)
        total = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)

        def frames():
            frame, more = first, True
            try:
                while more:
                    yield frame
                    more, frame = cap.read()
            finally:
                cap.release()

        return fps, total, frames()
    cap.release()
    import av

    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot read {path} as an image or video: {e}") from e

    def frames():
        with container:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="bgr24")

    return float(stream.average_rate or VIDEO_FPS), stream.frames, frames()


def _fit(frame: np.ndarray, resize_height: int | None) -> np.ndarray:
    """Resize to ``resize_height`` (keeping the aspect ratio, even width) and crop to
    even width and height (yuv420p video encoders need even sizes)."""
    h, w = frame.shape[:2]
    if resize_height and resize_height != h:
        new_w = max(2, 2 * round(w * resize_height / h / 2))
        interp = cv2.INTER_AREA if resize_height < h else cv2.INTER_CUBIC
        frame = cv2.resize(frame, (new_w, resize_height), interpolation=interp)
        h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.ascontiguousarray(frame[: h - h % 2, : w - w % 2])
    return frame


def _read_source(source: Path, max_frames: int | None, resize_height: int | None):
    """(fps, expected frame count, iterator of fitted BGR frames) of an image or video."""
    if source.suffix.lower() in IMAGE_SUFFIXES:
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read {source} as an image")
        fps, total, frames = float(VIDEO_FPS), 1, iter([image])
    else:
        fps, total, frames = _open_video(source)
    if max_frames:
        total = min(total, max_frames) if total else max_frames
        frames = itertools.islice(frames, max_frames)
    return fps, total, (_fit(f, resize_height) for f in frames)


# ---------------------------------------------------------------------------
# The cache


def _check_id(avatar_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", avatar_id):
        raise ValueError(f"invalid avatar id {avatar_id!r}: use letters, digits, '_', '-', '.'")


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_cached(path: Path, key: dict) -> bool:
    """Whether ``path`` holds a complete avatar prepared from the inputs in ``key``."""
    manifest = _read_manifest(path)
    return manifest is not None and all(manifest.get(k) == v for k, v in key.items())


def publish_atomically(tmp: Path, out: Path, is_complete: Callable[[Path], bool]) -> None:
    """Move the finished cache directory ``tmp`` to ``out`` atomically.

    A stale ``out`` (``is_complete(out)`` false: other inputs, or broken) is moved
    aside and deleted; if another process published a complete ``out`` meanwhile,
    its result is kept and the caller deletes ``tmp``.

    Raises:
        OSError: ``out`` could not be replaced after several tries.
    """
    for _ in range(5):
        try:
            os.replace(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
        if is_complete(out):
            return
        stale = out.with_name(f".{out.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not replace {out}")


def _build(out: Path, frames: Iterator[np.ndarray], total: int, fps: float, key: dict, label: str) -> Path:
    """Detect landmarks on ``frames`` (tracking the face), write the cache to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        (tmp / "frames").mkdir()
        rows, size, tracker = [], None, FaceTracker()
        for k, frame in enumerate(tqdm(frames, total=total or None, desc=f"avatar {out.name}", unit="frame")):
            if size is None:
                size = frame.shape[1::-1]
            elif frame.shape[1::-1] != size:
                raise ValueError(f"{label}: frame {k} is {frame.shape[1::-1]}, expected {size}")
            lm = tracker(frame)
            rows.append(np.full((68, 2), np.nan, np.float32) if lm is None else lm)
            if not cv2.imwrite(str(tmp / "frames" / FRAME_NAME.format(k)), frame, FRAME_PARAMS):
                raise OSError(f"cannot write frames to {tmp}")
        if not rows:
            raise ValueError(f"no frames decoded from {label}")
        landmarks = np.stack(rows)
        faces = int(np.isfinite(landmarks[:, 0, 0]).sum())
        if faces == 0:
            raise ValueError(f"no face found in {label}")
        np.save(tmp / "landmarks.npy", landmarks)
        manifest = {**key, "frame_count": len(rows), "frame_size": list(size), "fps": fps,
                    "frames_with_face": faces, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish_atomically(tmp, out, lambda p: _is_cached(p, key))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("avatar %r: %d frames %dx%d, face in %d, written to %s", out.name, len(rows), *size, faces, out)
    return out


def prepare_avatar(
    source: str | Path,
    avatar_id: str,
    root: str | Path = DEFAULT_ROOT,
    max_frames: int | None = None,
    resize_height: int | None = None,
    bbox_shift: int = 0,
    extra_margin: int = 0,
) -> Path:
    """Prepare (or reuse) the cached avatar ``root/avatar_id`` from an image or video.

    source: png/jpg/... image (a loop of one frame) or any video OpenCV or PyAV
    decodes. max_frames: keep only the first N frames. resize_height: scale frames
    to this height (aspect kept). Frames are cropped to even sizes. bbox_shift,
    extra_margin: MuseTalk face-box parameters (``face_box_from_landmarks``),
    stored in the manifest and applied by ``load_avatar``.

    The cache is reused when the source path, size, mtime and all parameters match;
    otherwise it is rebuilt in a temporary directory and renamed into place, so
    concurrent preparations never leave a half-written avatar. Returns the avatar
    directory. Raises FileNotFoundError for a missing source, ValueError for an
    unreadable source, an invalid id, or "no face found in <source>" when no frame
    has a face.
    """
    _check_id(avatar_id)
    source = Path(source).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"avatar source not found: {source}")
    stat = source.stat()
    key = {
        "version": FORMAT_VERSION,
        "source": str(source),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "params": {"max_frames": max_frames, "resize_height": resize_height,
                   "bbox_shift": bbox_shift, "extra_margin": extra_margin},
    }
    out = Path(root) / avatar_id
    if _is_cached(out, key):
        log.info("avatar %r: inputs unchanged, reusing cache at %s", avatar_id, out)
        return out
    fps, total, frames = _read_source(source, max_frames, resize_height)
    return _build(out, frames, total, fps, key, str(source))


def list_avatars(root: str | Path = DEFAULT_ROOT) -> list[str]:
    """Sorted ids of the prepared avatars under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and (p / "manifest.json").is_file())


def load_avatar(avatar_id: str, root: str | Path = DEFAULT_ROOT) -> Avatar:
    """Load a prepared avatar: frames, ping-pong loop and boxes from cached landmarks.

    Raises FileNotFoundError (listing the available ids) when ``root/avatar_id`` holds
    no prepared avatar, ValueError when it was prepared by an incompatible version,
    OSError when a cached frame cannot be read.
    """
    path = Path(root) / avatar_id
    manifest = _read_manifest(path)
    if manifest is None:
        available = ", ".join(list_avatars(root)) or "none"
        raise FileNotFoundError(
            f"avatar {avatar_id!r} not found in {root} (available: {available}); "
            f"prepare it with: python avatar.py prepare --source FILE --avatar_id {avatar_id}"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"avatar {avatar_id!r} has cache version {manifest.get('version')}, "
                         f"expected {FORMAT_VERSION}: prepare it again")
    n = manifest["frame_count"]
    files = [str(path / "frames" / FRAME_NAME.format(k)) for k in range(n)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        frames = list(pool.map(cv2.imread, files))
    if any(f is None for f in frames):
        raise OSError(f"avatar {avatar_id!r}: unreadable frame in {path / 'frames'}")
    landmarks = np.load(path / "landmarks.npy")
    params = manifest["params"]
    boxes = _boxes(landmarks, params["bbox_shift"], params["extra_margin"], tuple(manifest["frame_size"]))
    order = list(range(n)) + list(range(n - 1, -1, -1)) if n > 1 else [0]
    return Avatar(avatar_id, path, [frames[k] for k in order], landmarks[order], *(b[order] for b in boxes),
                  fps=int(round(manifest["fps"])))


def _default_frame() -> np.ndarray:
    """The astronaut cropped to a square DEFAULT_FACE_SCALE x her face box, DEFAULT_SIZE px."""
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    size = image.shape[1::-1]
    lm = detect_landmarks(image)
    if lm is None:
        raise RuntimeError("no face found in the scikit-image astronaut")
    x1, y1, x2, y2 = expand_box(face_box_from_landmarks(lm, frame_size=size), DEFAULT_FACE_SCALE, size)
    return cv2.resize(image[y1:y2, x1:x2], (DEFAULT_SIZE, DEFAULT_SIZE), interpolation=cv2.INTER_LANCZOS4)


def ensure_default_avatar(root: str | Path = DEFAULT_ROOT) -> Avatar:
    """The built-in avatar ``DEFAULT_AVATAR_ID``, prepared on first use (~1-2 s) from
    scikit-image's public-domain astronaut portrait, then loaded from the cache."""
    out = Path(root) / DEFAULT_AVATAR_ID
    key = {
        "version": FORMAT_VERSION,
        "source": DEFAULT_SOURCE,
        "params": {"face_scale": DEFAULT_FACE_SCALE, "size": DEFAULT_SIZE,
                   "bbox_shift": 0, "extra_margin": 0},
    }
    if not _is_cached(out, key):
        _build(out, iter([_default_frame()]), 1, float(VIDEO_FPS), key, DEFAULT_SOURCE)
    return load_avatar(DEFAULT_AVATAR_ID, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare and list avatars for the talking-avatar server.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="detect landmarks on an image or video and cache the avatar")
    prep.add_argument("--source", required=True, type=Path, help="image (png/jpg) or video file")
    prep.add_argument("--avatar_id", required=True, help="name of the avatar directory under --root")
    prep.add_argument("--max_frames", type=int, help="use only the first N frames")
    prep.add_argument("--resize_height", type=int, help="scale frames to this height in pixels")
    prep.add_argument("--bbox_shift", type=int, default=0, help="MuseTalk v1.0 face box shift, pixels")
    prep.add_argument("--extra_margin", type=int, default=0, help="MuseTalk v1.5 chin margin, pixels (10)")
    lst = sub.add_parser("list", help="list prepared avatars")
    for p in (prep, lst):
        p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="avatar cache directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        try:
            path = prepare_avatar(args.source, args.avatar_id, args.root, args.max_frames,
                                  args.resize_height, args.bbox_shift, args.extra_margin)
        except (FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            return 1
        print(f"avatar {args.avatar_id!r} written to {path}")
    else:
        for avatar_id in list_avatars(args.root):
            m = _read_manifest(args.root / avatar_id)
            w, h = m["frame_size"]
            print(f"{avatar_id}\t{m['frame_count']} frames\t{w}x{h}\t{m['source']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
