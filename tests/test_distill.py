"""Distilled MuseTalk (musetalk/distill.py, musetalk/student.py): data preparation,
losses that fall, resumable training, and the students served end to end.

Tiny teacher weights in the released formats (musetalk.checkpoints); a second of
../shared/media/yongen.mp4 with yongen.wav muxed in (or the built-in astronaut
frame with a tone when ../shared is absent), plus a clip without a face.
"""

import json

import av
import numpy as np
import pytest
import torch

from conftest import SHARED_MEDIA, tone
from musetalk.checkpoints import unet_config, write_models
from musetalk.distill import (
    LOSS_COLUMNS, DistillData, Distiller, LossWeights, TrainOptions, build_students, main, read_log, train,
)
from musetalk.models import (
    AudioPositionalEncoding, DecoderSwapVAE, MissingWeightsError, find_weights, load_unet, load_unet_folder,
    load_vae, load_vae_folder,
)
from musetalk.student import feature_channels, feature_pairs, student_unet_config, teacher_key

CLIP_FRAMES = 12
STEPS = 100  # optimizer steps on the fixed batch; each loss must fall >= FALL x (measured at 100: 4.5x-100x)
FALL = 3
AUDIO_DIM = 32  # the tiny checkpoints' Whisper width = cross_attention_dim


def _write_clip(path, frames_bgr, pcm16k=None, fps=25):
    """An MPEG-4 video (+ AAC mono 16 kHz audio when given) written with PyAV."""
    with av.open(str(path), "w") as c:
        video = c.add_stream("mpeg4", rate=fps)
        video.height, video.width = frames_bgr[0].shape[:2]
        video.pix_fmt = "yuv420p"
        if pcm16k is not None:  # every stream is added before the first packet
            audio = c.add_stream("aac", rate=16000)
            audio.layout = "mono"
        for f in frames_bgr:
            c.mux(video.encode(av.VideoFrame.from_ndarray(f, format="bgr24")))
        c.mux(video.encode())
        if pcm16k is not None:
            frame = av.AudioFrame.from_ndarray((pcm16k * 32767).astype(np.int16)[None], format="s16", layout="mono")
            frame.sample_rate = 16000
            c.mux(audio.encode(frame))
            c.mux(audio.encode())


def _talking_clip():
    """(BGR frames, 16 kHz audio) of CLIP_FRAMES frames: yongen when ../shared is here, else synthetic."""
    import cv2

    seconds = CLIP_FRAMES / 25
    if (SHARED_MEDIA / "yongen.mp4").exists() and (SHARED_MEDIA / "yongen.wav").exists():
        from audio import decode_audio

        frames = []
        with av.open(str(SHARED_MEDIA / "yongen.mp4")) as c:
            for frame in c.decode(video=0):
                frames.append(cv2.resize(frame.to_ndarray(format="bgr24"), (176, 304), interpolation=cv2.INTER_AREA))
                if len(frames) == CLIP_FRAMES:
                    break
        pcm = decode_audio((SHARED_MEDIA / "yongen.wav").read_bytes())[: int(seconds * 16000)]
        return frames, pcm
    from avatar import _default_frame

    still = cv2.resize(_default_frame(), (256, 256), interpolation=cv2.INTER_AREA)
    return [still] * CLIP_FRAMES, tone(seconds)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded CI machine
    OpenMP threads waiting for each other cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """models/ (tiny teacher), videos/ (one talking clip, one without a face) and the
    prepared data in out/data, made by the CLI with --prepare_only."""
    tmp = tmp_path_factory.mktemp("distill")
    write_models(tmp / "models", version="v15", audio_dim=AUDIO_DIM)
    videos = tmp / "videos"
    (videos / "sub").mkdir(parents=True)
    frames, pcm = _talking_clip()
    _write_clip(videos / "talk.mp4", frames, pcm)
    _write_clip(videos / "sub" / "noface.mp4", [np.full((128, 128, 3), 90, np.uint8)] * 4, pcm[:2560])
    assert main(["--videos", str(videos), "--models_dir", str(tmp / "models"), "--out", str(tmp / "out"),
                 "--prepare_only"]) == 0
    return tmp


@pytest.fixture(scope="module")
def teacher(workdir):
    paths = find_weights(workdir / "models")
    return load_unet(paths), load_vae(paths), json.loads(paths.unet_config.read_text())


def test_prepared_data_skips_faceless_clips_and_resumes(workdir):
    data_dir = workdir / "out" / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["counts"] == {"ok": 1, "skipped": 1}
    (ok,) = [e for e in manifest["clips"].values() if e["status"] == "ok"]
    (skipped,) = [e for e in manifest["clips"].values() if e["status"] == "skipped"]
    assert "face" in skipped["reason"] and skipped["source"].endswith("noface.mp4")
    assert ok["frames"] == CLIP_FRAMES and ok["valid"] >= CLIP_FRAMES - 1
    data = DistillData(data_dir)
    batch = data.batch(3, 0, 4)
    assert batch["latents"].shape == (4, 8, 32, 32) and batch["audio"].shape == (4, 50, AUDIO_DIM)
    assert batch["target"].shape == (4, 4, 32, 32)
    assert torch.equal(batch["latents"], data.batch(3, 0, 4)["latents"])  # a step's batch is reproducible
    assert float(batch["audio"].abs().mean()) > 0  # features of the clip's own audio track
    # a second run finds everything done: nothing is prepared again
    stamp = {p.name: p.stat().st_mtime_ns for p in (data_dir / "clips").rglob("*.npy")}
    assert main(["--videos", str(workdir / "videos"), "--models_dir", str(workdir / "models"),
                 "--out", str(workdir / "out"), "--prepare_only"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (data_dir / "clips").rglob("*.npy")} == stamp
    assert json.loads((data_dir / "manifest.json").read_text())["clips"] == manifest["clips"]


class _FixedCrop:
    """One fixed training batch cropped to 8x8 latents (the tiny UNet's self-attention
    at 32x32 costs ~0.4 s a step on a CI core) whose target is the teacher's own
    output: a teacher that reproduces its ground truth, as the released one nearly
    does, so the KD and reconstruction losses agree (a random teacher's do not)."""

    def __init__(self, data, teacher, pe):
        b = data.batch(0, 0, 2)
        self.fixed = {"latents": b["latents"][:, :, 20:28, 12:20].contiguous(), "audio": b["audio"]}
        with torch.no_grad():
            self.fixed["target"] = teacher(self.fixed["latents"], 0, encoder_hidden_states=pe(b["audio"])).sample

    def batch(self, step, micro, batch_size):
        return self.fixed


def _distiller(teacher, weights=LossWeights(), width=1.0):
    unet, vae, config = teacher
    torch.manual_seed(0)
    student, tiny, report = build_students(unet, None, config, "cpu", True, True, tiny_size="tiny", width=width)
    return Distiller(unet, student, vae, tiny, AudioPositionalEncoding(AUDIO_DIM), config, weights), report


def test_every_distillation_loss_falls_on_a_fixed_batch(workdir, teacher, tmp_path):
    distiller, report = _distiller(teacher)
    assert report["unet_init"]["copied"] > 0.9 * report["unet_init"]["total"]  # BK-SDM init from the teacher
    data = _FixedCrop(DistillData(workdir / "out" / "data"), teacher[0], distiller.pe)
    opts = TrainOptions(steps=STEPS, batch_size=2, lr=1e-3, vae_lr=3e-3, save_every=1000, weights=LossWeights())
    train(distiller, data, tmp_path, opts)
    distiller.close()
    rows = read_log(tmp_path / "losses.csv")
    assert len(rows) == STEPS and list(rows[0]) == list(LOSS_COLUMNS)
    for loss in ("out_kd", "feat_kd", "rec_l1", "unet_total", "vae_l1"):
        first, last = rows[0][loss], np.mean([r[loss] for r in rows[-10:]])
        assert last < first / FALL, f"{loss}: {first:.4g} -> {last:.4g} (want a {FALL}x fall in {STEPS} steps)"
    # the end of training is exported where the server loads it
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "vae" / "config.json").is_file()


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_resuming_from_a_checkpoint_continues_the_same_loss_curve(workdir, teacher, tmp_path, width):
    """Also for a narrower student, whose feature KD goes through trained 1x1 projections."""
    data = DistillData(workdir / "out" / "data")

    class Small:  # real varying batches, cropped for speed
        def batch(self, step, micro, batch_size):
            b = data.batch(step, micro, batch_size)
            return {"latents": b["latents"][:, :, 16:24, 12:20], "audio": b["audio"],
                    "target": b["target"][:, :, 16:24, 12:20]}

    opts = dict(batch_size=2, grad_accum=2, lr=1e-3, vae_lr=3e-3, save_every=5)
    straight, _ = _distiller(teacher, width=width)
    assert len(straight.projections) == (0 if width == 1.0 else len(straight.pairs))
    train(straight, Small(), tmp_path / "a", TrainOptions(steps=10, **opts))
    first, _ = _distiller(teacher, width=width)
    train(first, Small(), tmp_path / "b", TrainOptions(steps=5, **opts))
    resumed, _ = _distiller(teacher, width=width)  # a new process's students: all state comes from the checkpoint
    result = train(resumed, Small(), tmp_path / "b", TrainOptions(steps=10, **opts))
    assert result["start_step"] == 5
    a, b = read_log(tmp_path / "a" / "losses.csv"), read_log(tmp_path / "b" / "losses.csv")
    assert [r["step"] for r in b] == list(range(1, 11))
    for loss in ("out_kd", "feat_kd", "rec_l1", "vae_l1"):
        np.testing.assert_allclose([r[loss] for r in b], [r[loss] for r in a], rtol=1e-4, err_msg=loss)
    for d in (straight, first, resumed):
        d.close()


@pytest.fixture(scope="module")
def students(workdir):
    """A short CLI distillation on the prepared data: OUT/unet and OUT/vae."""
    out = workdir / "out"
    assert main(["--videos", str(workdir / "videos"), "--models_dir", str(workdir / "models"), "--out", str(out),
                 "--steps", "3", "--batch_size", "1", "--tiny_size", "tiny", "--save_every", "2"]) == 0
    assert [r["step"] for r in read_log(out / "losses.csv")] == [1, 2, 3]
    return out


def test_students_load_through_the_server_loaders(workdir, students, teacher):
    unet = load_unet_folder(students / "unet")
    assert sum(p.numel() for p in unet.parameters()) < 0.5 * sum(p.numel() for p in teacher[0].parameters())
    out = unet(torch.zeros(2, 8, 32, 32), 0, encoder_hidden_states=torch.zeros(2, 50, AUDIO_DIM)).sample
    assert out.shape == (2, 4, 32, 32)
    vae = load_vae_folder(students / "vae", teacher[1])
    assert isinstance(vae, DecoderSwapVAE)
    assert vae.decode(out / 0.18215).sample.shape == (2, 3, 256, 256)
    # the avatar cache key: latents still come from the SD encoder, so the cache is shared;
    # a VAE that encodes differently (the AutoencoderTiny itself) gets another key
    from musetalk.prepare import vae_identity

    assert vae_identity(vae) == vae_identity(teacher[1])
    assert vae_identity(vae.tiny) != vae_identity(teacher[1])
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        load_unet_folder(workdir / "videos")
    with pytest.raises(MissingWeightsError, match="not a MuseTalk UNet"):
        load_unet_folder(students / "vae")  # an AutoencoderTiny config


def test_students_serve_the_end_to_end_musetalk_pipeline(workdir, students):
    """The server with --musetalk_unet/--musetalk_vae passes test_musetalk_e2e's own
    end-to-end check (faces generated and pasted inside the crop box, idle untouched)."""
    import test_musetalk_e2e as e2e
    from client import ServerProcess

    srv = ServerProcess(workdir, "--model", "musetalk", "--models_dir", str(workdir / "models"),
                        "--latency_mode", "balanced", "--parsing", "landmarks",
                        "--musetalk_unet", str(students / "unet"), "--musetalk_vae", str(students / "vae"))
    srv.workdir = workdir
    try:
        e2e.test_musetalk_pipeline_pastes_faces_inside_the_crop_box(srv)
    finally:
        srv.stop()


@pytest.mark.parametrize("width", [1.0, 0.6])
def test_full_size_student_keeps_musetalk_shapes_on_the_meta_device(width):
    from diffusers import UNet2DConditionModel

    teacher_config = unet_config("full")
    config = student_unet_config(teacher_config, width)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(teacher_config)
        student = UNet2DConditionModel.from_config(config)
        latents, audio = torch.empty(4, 8, 32, 32), torch.empty(4, 50, 384)
    assert student.mid_block is None and len(student.down_blocks) == 3 and student.config.layers_per_block == 1
    assert (student.config.in_channels, student.config.out_channels, student.config.cross_attention_dim) == (8, 4, 384)
    n_student, n_teacher = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    if width == 1.0:
        assert 250e6 < n_student < 0.45 * n_teacher  # BK-SDM-Tiny: ~1/3 of SD-1.5's UNet
        assert list(student.config.block_out_channels) == [320, 640, 1280]
    else:
        assert list(student.config.block_out_channels) == [192, 384, 768] and n_student < 0.2 * n_teacher
    shapes = {}
    hooks = [m.get_submodule(name).register_forward_hook(
        lambda mod, args, out, key=(tag, name): shapes.__setitem__(key, (out[0] if isinstance(out, tuple) else out).shape))
        for s, t in feature_pairs(teacher_config) for tag, m, name in (("s", student, s), ("t", teacher, t))]
    with torch.no_grad():
        assert student(latents, 0, encoder_hidden_states=audio).sample.shape == (4, 4, 32, 32)
        teacher(latents, 0, encoder_hidden_states=audio)
    for h in hooks:
        h.remove()
    for s, t in feature_pairs(teacher_config):  # every feature-KD pair compares like with like (spatially;
        # a narrower student's channels go through its projection)
        assert shapes[("s", s)][2:] == shapes[("t", t)][2:], (s, t)
        assert shapes[("s", s)][1] == feature_channels(config, s) and shapes[("t", t)][1] == feature_channels(
            teacher_config, t)
        assert (shapes[("s", s)] == shapes[("t", t)]) == (width == 1.0)
    # every student tensor has a teacher tensor of its shape (or wider) to start from
    t_state = teacher.state_dict()
    for key, tensor in student.state_dict().items():
        source = t_state[teacher_key(key, teacher_config)].shape
        assert source == tensor.shape if width == 1.0 else all(a >= b for a, b in zip(source, tensor.shape)), key


def test_speed_benchmark_reports_every_model(tmp_path):
    """bench/distill_speed.py end to end on tiny configs (the figures are in docs/benchmarks.md)."""
    from bench.distill_speed import main as bench

    result = bench(["--tiny", "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == result["speedup"]
    models = result["models"]
    assert set(models) == {"teacher_unet", "student_unet", "student_unet_narrow", "sd_decoder", "tiny_decoder"}
    assert models["student_unet"]["params_m"] < models["teacher_unet"]["params_m"]
    for slow, fast in (("teacher_unet", "student_unet"), ("student_unet", "student_unet_narrow"),
                       ("sd_decoder", "tiny_decoder")):
        assert 0 < models[fast]["gmacs_per_frame"] < models[slow]["gmacs_per_frame"], (slow, fast)
    assert all(v > 0 for row in models.values() for v in row["ms_per_frame"].values())
