"""MuseTalk end to end on tiny weights written in the released formats: the same
server, the same loaders and the same session pipeline users run, on the CPU."""

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar import load_avatar
from client import VIDEO_SCALE, AvatarClient, ServerProcess
from musetalk.checkpoints import write_models
from conftest import ROOT, SPEECH_RMS, not_, frame_rms, speech_input, wait_until


@pytest.fixture(scope="module")
def musetalk_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muse")
    write_models(tmp / "models", version="v15")
    srv = ServerProcess(tmp, "--model", "musetalk", "--models_dir", str(tmp / "models"),
                        "--latency_mode", "balanced", "--parsing", "landmarks")
    srv.workdir = tmp
    yield srv
    srv.stop()


def test_musetalk_pipeline_pastes_faces_inside_the_crop_box(musetalk_server):
    srv = musetalk_server
    assert srv.status()["model"] == "musetalk"

    async def run():
        async with AvatarClient(srv.url) as c:
            await asyncio.wait_for(c.first_video.wait(), 60)
            await asyncio.sleep(1.5)
            n_idle = len(c.received.video)
            kind, payload = speech_input()
            r = await (c.push_audio_file(payload) if kind == "file" else c.say(payload))
            assert r["code"] == 0, r
            assert await wait_until(c.is_speaking, 10)
            assert await wait_until(lambda: not_(c.is_speaking), 120)
            await asyncio.sleep(1.0)
            return c.received, n_idle

    rec, n_idle = asyncio.run(run())
    av = load_avatar("default", srv.workdir / "avatars")
    width, height = av.size
    # frames arrive at the avatar's resolution
    assert rec.first_frame_bgr.shape == (height, width, 3)
    assert frame_rms(rec).max() > SPEECH_RMS  # speech audio arrived
    reference = rec.video[n_idle - 1].astype(np.float32)
    (cache,) = (srv.workdir / "avatars" / "default").glob("musetalk-v15-*")  # the server's MuseTalk data
    crop_box, face_box = np.load(cache / "crop_boxes.npy")[0], np.load(cache / "face_boxes.npy")[0]
    x1, y1, x2, y2 = (int(round(v * VIDEO_SCALE)) for v in crop_box)
    inside = np.zeros(reference.shape, bool)
    inside[y1:y2, x1:x2] = True
    margin = np.zeros(reference.shape, bool)  # codec blocks may bleed a little past the box
    margin[max(0, y1 - 8) : y2 + 8, max(0, x1 - 8) : x2 + 8] = True
    diffs = [np.abs(f.astype(np.float32) - reference) for f in rec.video[n_idle:]]
    changed = [d[inside].mean() for d in diffs]
    talking = [i for i, v in enumerate(changed) if v > 2.0]
    assert len(talking) >= 10, f"generated faces never showed: max change {max(changed):.2f}"
    # Outside the box there is only codec noise: random-weight faces make VP8
    # requantise the whole picture a little and its quality drifts slowly. Exact
    # pixel containment, without the codec: test_musetalk_model_patches_stay_in_the_crop_box.
    fy1, fy2 = (int(round(v * VIDEO_SCALE)) for v in face_box[[1, 3]])
    redrawn = np.zeros(reference.shape, bool)
    redrawn[(fy1 + fy2) // 2 : y2, x1:x2] = True
    redrawn_mean = np.mean([diffs[i][redrawn].mean() for i in talking])
    outside = np.array([diffs[i][~margin].mean() for i in talking])
    assert outside.max() < 3.0 and outside.mean() < 0.2 * redrawn_mean, (outside.max(), outside.mean(), redrawn_mean)
    # idle frames before speech are untouched
    idle_drift = max(np.abs(f.astype(np.float32) - reference).mean() for f in rec.video[n_idle - 10 : n_idle])
    assert idle_drift < 1.0, idle_drift


def test_musetalk_model_patches_stay_in_the_crop_box(tmp_path):
    """In process, no codec: every generated pixel lands inside the crop box."""
    import threading

    from avatar import ensure_default_avatar
    from baseasr import AudioInbox, AudioSegment, StageQueue
    from config import parse_args
    from musereal import musetalk_model_factory
    from conftest import tone

    write_models(tmp_path / "models", version="v15")
    av = ensure_default_avatar(tmp_path / "avatars")
    args = parse_args(["--models_dir", str(tmp_path / "models"), "--parsing", "landmarks"])
    model = musetalk_model_factory(args, av)()
    out, inbox, stop = StageQueue(100), AudioInbox(10), threading.Event()
    asr = model.make_asr(out_queue=out, inbox=inbox, epoch=lambda: 0, loop_hint=lambda: 0, stop_event=stop)
    asr.start()
    inbox.put(AudioSegment(tone(0.5), epoch=0))
    units = []
    while not units or not units[-1].final:
        u = out.get(timeout=30)
        assert u is not None
        units.append(u)
    stop.set()
    speech = [u for u in units if u.speech]
    assert speech and all(u.features.shape == (50, 32) for u in speech)
    patches = model.infer(np.stack([u.features for u in speech]), [u.loop_index for u in speech])
    mav = model.engine.avatar  # MuseTalk's boxes: v1.5 adds extra_margin below the chin
    x1, y1, x2, y2 = mav.crop_boxes[0]
    idle = av.frame(0)
    for patch in patches:
        assert tuple(patch.box) == (x1, y1, x2, y2)
        frame = av.composite(0, patch)
        changed = np.any(frame != idle, axis=2)
        ys, xs = np.nonzero(changed)
        assert len(ys) > 100, "nothing was pasted"
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
        fy1, fy2 = mav.face_boxes[0][1], mav.face_boxes[0][3]
        assert ys.min() >= (fy1 + fy2) // 2 - 1  # only the lower half of the face is redrawn


def test_musetalk_in_half_precision_draws_the_same_faces(tmp_path):
    """--musetalk_dtype bf16 (the half-precision path CUDA takes with fp16): avatar
    preparation with a half VAE, the engine and the float32 Whisper features all run,
    and the faces match float32's up to rounding."""
    from avatar import ensure_default_avatar
    from config import parse_args
    from musereal import musetalk_model_factory

    write_models(tmp_path / "models", version="v15")
    av = ensure_default_avatar(tmp_path / "avatars")
    faces = {}
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((3, 50, 32)).astype(np.float32)
    for dtype in ("fp32", "bf16"):
        args = parse_args(["--models_dir", str(tmp_path / "models"), "--parsing", "landmarks",
                           "--musetalk_dtype", dtype])
        model = musetalk_model_factory(args, av)()
        assert model.engine.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert next(model.extractor.encoder.parameters()).dtype == torch.float32
        faces[dtype] = model.engine.render(audio, [0, 0, 0]).astype(int)
    assert faces["bf16"].shape == (3, 256, 256, 3)
    assert np.abs(faces["bf16"] - faces["fp32"]).mean() < 8  # uint8 levels
    assert not np.array_equal(faces["bf16"][0], faces["bf16"][1])  # still driven by the audio


def test_missing_weights_stop_the_server_with_every_expected_path(tmp_path):
    models = tmp_path / "models"
    write_models(models, version="v15")
    (models / "musetalkV15" / "unet.pth").unlink()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", "musetalk", "--models_dir", str(models),
         "--avatars_dir", str(tmp_path / "avatars"), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "unet.pth" in err and "[missing]" in err and "download_weights.sh" in err, err[-2000:]
    for expected in ("musetalk.json", "sd-vae", "tiny.pt"):
        assert expected in err, expected


def test_engine_merges_concurrent_sessions_into_one_batch(tmp_path):
    """Continuous batching: requests from sessions due at the same time share one
    forward pass, and each session gets exactly its own faces back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from avatar import ensure_default_avatar
    from config import parse_args
    from musereal import musetalk_model_factory

    write_models(tmp_path / "models", version="v15")
    av = ensure_default_avatar(tmp_path / "avatars")
    args = parse_args(["--models_dir", str(tmp_path / "models"), "--parsing", "landmarks"])
    engine = musetalk_model_factory(args, av)().engine
    rng = np.random.default_rng(0)
    requests = [(rng.standard_normal((2, 50, 32)).astype(np.float32), [0, 0]) for _ in range(3)]
    alone = [engine.render(audio, idx) for audio, idx in requests]
    assert engine.batch_sizes[-3:] == [2, 2, 2]
    assert not np.array_equal(alone[0], alone[1])  # different audio, different faces

    entered, release = threading.Event(), threading.Event()
    forward = engine._forward

    def held_forward(audio, idx):  # keep the device busy while other sessions queue up
        entered.set()
        release.wait(30)
        return forward(audio, idx)

    engine._forward = held_forward
    with ThreadPoolExecutor(3) as sessions:
        first = sessions.submit(engine.render, *requests[0])
        assert entered.wait(30)
        rest = [sessions.submit(engine.render, *r) for r in requests[1:]]
        while engine._requests.qsize() < 2:
            threading.Event().wait(0.01)  # test-side polling until both are queued
        release.set()
        results = [first.result(60)] + [f.result(60) for f in rest]
    assert engine.batch_sizes[-2:] == [2, 4]  # the two waiting sessions shared one pass
    for got, want in zip(results, alone):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def _engine_and_audio(tmp_path, frames: int):
    from avatar import ensure_default_avatar
    from config import parse_args
    from musereal import musetalk_model_factory

    write_models(tmp_path / "models", version="v15")
    av = ensure_default_avatar(tmp_path / "avatars")
    args = parse_args(["--models_dir", str(tmp_path / "models"), "--parsing", "landmarks"])
    engine = musetalk_model_factory(args, av)().engine
    audio = np.random.default_rng(1).standard_normal((frames, 50, 32)).astype(np.float32)
    return engine, audio


def test_bucketed_engine_pads_and_splits_without_changing_faces(tmp_path):
    """Batches padded up to a bucket size (or split above the largest) give every
    frame the face it gets unpadded: the padding never leaks into real frames."""
    from musetalk.inference import MuseTalkEngine

    engine, audio = _engine_and_audio(tmp_path, 5)
    want = engine.render(audio, [0] * 5)
    bucketed = MuseTalkEngine(engine.models, engine.avatar, buckets=(2, 4))
    assert bucketed._bucket(3) == 4 and bucketed._bucket(1) == 2
    for n in (1, 3, 5):  # 1 -> 2, 3 -> 4, 5 -> 4 + (1 -> 2)
        got = bucketed.render(audio[:n], [0] * n)
        assert got.shape == (n, 256, 256, 3)
        assert np.abs(got.astype(int) - want[:n].astype(int)).max() <= 2
    with pytest.raises(ValueError, match="compile mode"):
        MuseTalkEngine(engine.models, engine.avatar, compile_mode="fastest")


def test_compiled_engine_traces_and_matches_eager(tmp_path):
    """--musetalk_compile: the UNet+VAE step goes through torch.compile (dynamo with
    the eager backend here; inductor on a GPU) for each bucket and draws the same faces."""
    from musetalk.inference import MuseTalkEngine

    engine, audio = _engine_and_audio(tmp_path, 3)
    want = engine.render(audio, [0] * 3)
    compiled = MuseTalkEngine(engine.models, engine.avatar, max_batch=4, compile_mode="default",
                              buckets=(2, 4), compile_backend="eager")
    compiled.warmup()
    got = compiled.render(audio, [0] * 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_engine_never_merges_past_max_batch(tmp_path):
    """A waiting request that would take a pass over ``max_batch`` frames waits for
    the next pass (a compiled engine then never meets an uncompiled batch size)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from musetalk.inference import MuseTalkEngine

    engine, audio = _engine_and_audio(tmp_path, 3)
    small = MuseTalkEngine(engine.models, engine.avatar, max_batch=4)
    entered, release = threading.Event(), threading.Event()
    forward = small._forward

    def held_forward(a, idx):
        entered.set()
        release.wait(30)
        return forward(a, idx)

    small._forward = held_forward
    with ThreadPoolExecutor(3) as sessions:
        first = sessions.submit(small.render, audio[:2], [0, 0])
        assert entered.wait(30)
        second = sessions.submit(small.render, audio[:3], [0, 0, 0])
        while small._requests.qsize() < 1:
            threading.Event().wait(0.01)  # test-side polling until queued
        third = sessions.submit(small.render, audio[:2], [0, 0])
        while small._requests.qsize() < 2:
            threading.Event().wait(0.01)
        release.set()
        shapes = [f.result(60).shape[0] for f in (first, second, third)]
    assert shapes == [2, 3, 2]
    assert small.batch_sizes == [2, 3, 2]  # 3 + 2 > 4: the third waited for its own pass
