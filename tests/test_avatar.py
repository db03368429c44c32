"""Tests for avatar.py: preparation, caching, loading, boxes and compositing (CPU, ~15 s)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avatar as A  # noqa: E402

YONGEN = Path(__file__).resolve().parents[1].parent / "shared" / "media" / "yongen.mp4"


@pytest.fixture(scope="module")
def default_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avatars")
    A.ensure_default_avatar(root)
    return root


@pytest.fixture(scope="module")
def face_frame(default_root) -> np.ndarray:
    """A 256x256 BGR frame with a clear frontal face (the default avatar, scaled down)."""
    frame = A.load_avatar(A.DEFAULT_AVATAR_ID, default_root).frames[0]
    return cv2.resize(frame, (256, 256), interpolation=cv2.INTER_AREA)


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def assert_aligned(av: A.Avatar) -> None:
    n = len(av.frames)
    assert len(av) == n
    for arr, shape, dtype in ((av.landmarks, (n, 68, 2), np.float32), (av.face_boxes, (n, 4), np.int32),
                              (av.crop_boxes, (n, 4), np.int32), (av.mouth_boxes, (n, 4), np.int32)):
        assert arr.shape == shape and arr.dtype == dtype


def assert_boxes_sane(av: A.Avatar, k: int) -> None:
    w, h = av.size
    lm = av.landmarks[k]
    fx1, fy1, fx2, fy2 = av.face_boxes[k]
    cx1, cy1, cx2, cy2 = av.crop_boxes[k]
    mx1, my1, mx2, my2 = av.mouth_boxes[k]
    assert np.isfinite(lm).all()
    assert 0 <= fx1 < fx2 <= w and 0 <= fy1 < fy2 <= h
    assert cx2 - cx1 == cy2 - cy1  # square
    assert 0 <= cx1 <= fx1 and 0 <= cy1 <= fy1 and fx2 <= cx2 <= w and fy2 <= cy2 <= h
    assert fx1 <= mx1 < mx2 <= fx2 and fy1 <= my1 < my2 <= fy2
    assert (my1 + my2) / 2 > lm[33, 1]  # mouth centre below the nose tip (iBUG 33)


def test_default_avatar_prepares_and_loads(default_root):
    av = A.ensure_default_avatar(default_root)
    assert av.avatar_id == A.DEFAULT_AVATAR_ID and av.path == default_root / A.DEFAULT_AVATAR_ID
    assert av.size == (512, 512) and len(av) == 1 and av.fps == 25
    assert av.frames[0].dtype == np.uint8 and av.frames[0].shape == (512, 512, 3)
    assert_aligned(av)
    assert_boxes_sane(av, 0)
    x1, y1, x2, y2 = av.face_boxes[0]
    assert x2 - x1 >= 180  # the face fills a good part of the frame
    assert av.frame(7) is av.frames[0] and av.source_index(7) == 0


def test_default_avatar_is_cached(default_root):
    manifest = default_root / A.DEFAULT_AVATAR_ID / "manifest.json"
    before = manifest.stat().st_mtime_ns
    t0 = time.perf_counter()
    A.ensure_default_avatar(default_root)
    assert time.perf_counter() - t0 < 0.5
    assert manifest.stat().st_mtime_ns == before
    assert A.list_avatars(default_root) == [A.DEFAULT_AVATAR_ID]


def test_cache_reuse_and_rebuild(tmp_path, face_frame, caplog):
    source = tmp_path / "face.png"
    cv2.imwrite(str(source), face_frame)
    root = tmp_path / "avatars"
    out = A.prepare_avatar(source, "img", root)
    manifest = out / "manifest.json"
    first = manifest.stat().st_mtime_ns
    data = json.loads(manifest.read_text())
    assert data["frame_count"] == 1 and data["frame_size"] == [256, 256]
    assert data["source"] == str(source.resolve())

    with caplog.at_level(logging.INFO, logger="avatar"):
        assert A.prepare_avatar(source, "img", root) == out
    assert "reusing" in caplog.text
    assert manifest.stat().st_mtime_ns == first

    A.prepare_avatar(source, "img", root, resize_height=128)  # other parameters: rebuilt
    assert A.load_avatar("img", root).size == (128, 128)
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched source: rebuilt
    A.prepare_avatar(source, "img", root, resize_height=128)
    assert json.loads(manifest.read_text())["source_mtime_ns"] == source.stat().st_mtime_ns
    assert sorted(p.name for p in root.iterdir()) == ["img"]  # no temporary directories left


def test_no_face_raises(tmp_path):
    source = tmp_path / "blank.png"
    gradient = np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (120, 1, 3))
    cv2.imwrite(str(source), gradient)
    with pytest.raises(ValueError, match="no face found in .*blank.png"):
        A.prepare_avatar(source, "blank", tmp_path / "avatars")
    assert A.list_avatars(tmp_path / "avatars") == []
    assert list((tmp_path / "avatars").iterdir()) == []


def test_bad_sources_and_ids(tmp_path):
    with pytest.raises(FileNotFoundError):
        A.prepare_avatar(tmp_path / "missing.mp4", "x", tmp_path)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        A.prepare_avatar(junk, "x", tmp_path / "avatars")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read"):
        A.prepare_avatar(broken, "x", tmp_path / "avatars")
    with pytest.raises(ValueError, match="invalid avatar id"):
        A.prepare_avatar(junk, "../escape", tmp_path / "avatars")


def test_load_missing_lists_available(default_root):
    with pytest.raises(FileNotFoundError, match="available: default"):
        A.load_avatar("nobody", default_root)


def test_video_ping_pong_and_faceless_frames(tmp_path, face_frame):
    black = np.zeros_like(face_frame)
    frames = [face_frame, face_frame, black, black, face_frame, face_frame]
    source = write_video(tmp_path / "clip.mp4", frames)
    A.prepare_avatar(source, "clip", tmp_path / "avatars")
    av = A.load_avatar("clip", tmp_path / "avatars")
    assert len(av) == 12 and av.size == (256, 256)
    assert_aligned(av)
    assert [av.source_index(k) for k in range(12)] == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]
    assert all(av.frames[k] is av.frames[11 - k] for k in range(6))
    no_face = {2, 3, 8, 9}  # source frames 2, 3 and their mirrors in the reversed half
    for k in range(12):
        if k in no_face:
            assert np.isnan(av.landmarks[k]).all()
            for boxes in (av.face_boxes, av.crop_boxes, av.mouth_boxes):
                assert (boxes[k] == -1).all()
        else:
            assert_boxes_sane(av, k)
    assert av.frame(12) is av.frames[0]


@pytest.mark.skipif(not YONGEN.is_file(), reason=f"{YONGEN} not present")
def test_real_video(tmp_path):
    A.prepare_avatar(YONGEN, "yongen", tmp_path, max_frames=20, resize_height=480)
    av = A.load_avatar("yongen", tmp_path)
    assert len(av) == 40 and av.size == (278, 480) and av.fps == 25
    assert_aligned(av)
    for k in range(len(av)):
        assert_boxes_sane(av, k)
    x1, y1, x2, y2 = av.face_boxes[:20].T
    assert (x2 - x1 > 60).all() and (x2 - x1 < 200).all()
    assert (np.abs((x1 + x2) / 2 - 139) < 50).all()  # the face is central in this clip
    # tracked landmarks do not jitter: the mouth centre moves < 8 px between frames
    mouth = av.landmarks[:20, 48:68].mean(axis=1)
    assert np.linalg.norm(np.diff(mouth, axis=0), axis=1).max() < 8


def test_box_rules():
    lm = np.zeros((68, 2), np.float32)
    lm[:, 0] = np.linspace(100, 200, 68)
    lm[:, 1] = 150
    lm[29, 1], lm[8, 1] = 150, 230  # nose bridge, chin
    assert A.face_box_from_landmarks(lm) == (100, 70, 200, 230)
    assert A.face_box_from_landmarks(lm, bbox_shift=10) == (100, 90, 200, 230)
    assert A.face_box_from_landmarks(lm, extra_margin=10) == (100, 70, 200, 240)
    assert A.face_box_from_landmarks(lm, extra_margin=10, frame_size=(180, 235)) == (100, 70, 180, 235)
    assert A.expand_box((100, 70, 200, 230), 1.5, (640, 480)) == (30, 30, 270, 270)
    assert A.expand_box((0, 0, 100, 100), 1.5, (640, 480)) == (0, 0, 150, 150)  # moved inside, still square
    assert A.expand_box((500, 400, 600, 480), 1.5, (640, 480)) == (475, 330, 625, 480)  # moved up
    assert A.expand_box((0, 0, 400, 400), 1.5, (640, 480)) == (0, 0, 600, 480)  # too tall: cut to the frame


def synthetic_avatar() -> A.Avatar:
    frame = np.full((512, 512, 3), 100, np.uint8)
    rows = np.full((1, 4), -1, np.int32)
    landmarks = np.full((1, 68, 2), np.nan, np.float32)
    return A.Avatar("synthetic", Path("."), [frame], landmarks, rows, rows, rows)


def test_composite_blends_inside_box_only():
    av = synthetic_avatar()
    idle = av.frames[0]
    assert av.composite(3, None) is idle
    mask = np.ones((150, 150), np.float32)
    mask[:, :50] = 0.0  # left third keeps the frame
    mask[:, 50:100] = 0.5
    patch = A.FacePatch(np.full((150, 150, 3), 200, np.uint8), (100, 120, 250, 270), mask)
    out = av.composite(0, patch)
    assert out is not idle and (idle == 100).all()  # the loop frame is untouched
    inside = np.zeros((512, 512), bool)
    inside[120:270, 150:250] = True
    assert (out[~inside] == 100).all()
    assert (out[120:270, 150:200] == 150).all() and (out[120:270, 200:250] == 200).all()
    full = av.composite(0, A.FacePatch(np.full((150, 150, 3), 7, np.uint8), (100, 120, 250, 270), None))
    assert (full[120:270, 100:250] == 7).all() and (full[:120] == 100).all()


def test_composite_edges_and_resize():
    av = synthetic_avatar()
    white = np.full((100, 100, 3), 255, np.uint8)
    patch = A.FacePatch(white, (-40, 450, 60, 550), np.ones((100, 100), np.float32))
    out = av.composite(0, patch)
    assert (out[450:, :60] == 255).all()
    changed = (out != 100).any(axis=2)
    assert changed.sum() == 62 * 60
    assert av.composite(0, A.FacePatch(patch.image, (600, 600, 700, 700), None)) is av.frames[0]
    small = A.FacePatch(np.full((32, 32, 3), 0, np.uint8), (10, 10, 74, 74), np.ones((32, 32), np.float32))
    out = av.composite(0, small)  # patch resized to its 64x64 box
    assert (out[10:74, 10:74] == 0).all() and (out[74:] == 100).all() and (out[:, 74:] == 100).all()


def test_composite_is_fast():
    av = synthetic_avatar()
    rng = np.random.default_rng(0)
    patch = A.FacePatch(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8), (180, 200, 330, 350),
                        rng.random((150, 150), dtype=np.float32))
    av.composite(0, patch)
    t0 = time.perf_counter()
    for _ in range(100):
        av.composite(0, patch)
    assert (time.perf_counter() - t0) / 100 < 0.002


def test_cli(tmp_path, face_frame, capsys):
    source = tmp_path / "face.jpg"
    cv2.imwrite(str(source), face_frame)
    root = tmp_path / "avatars"
    assert A.main(["prepare", "--source", str(source), "--avatar_id", "cli", "--root", str(root)]) == 0
    assert str(root / "cli") in capsys.readouterr().out
    assert A.main(["list", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith("cli\t1 frames\t256x256")
    missing = str(tmp_path / "nope.png")
    assert A.main(["prepare", "--source", missing, "--avatar_id", "x", "--root", str(root)]) == 1


def test_concurrent_prepare(tmp_path, face_frame):
    """Two processes preparing the same avatar at once both succeed; the cache stays whole."""
    import subprocess

    source = tmp_path / "face.png"
    cv2.imwrite(str(source), face_frame)
    root = tmp_path / "avatars"
    code = f"import avatar; print(avatar.prepare_avatar({str(source)!r}, 'same', {str(root)!r}))"
    env = {**os.environ, "PYTHONPATH": str(Path(A.__file__).parent)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == str(root / "same")
    assert sorted(p.name for p in root.iterdir()) == ["same"]
    assert len(A.load_avatar("same", root)) == 1
