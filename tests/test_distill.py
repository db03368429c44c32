"""Distilled MuseTalk (musetalk/distill.py, musetalk/student.py): data preparation,
losses that fall, resumable training, and the students served end to end.

Tiny teacher weights in the released formats (musetalk.checkpoints); a second of
../shared/media/yongen.mp4 with yongen.wav muxed in (or the built-in astronaut
frame with a tone when ../shared is absent), plus a clip without a face.
"""

import json
import os
import shutil

import av
import numpy as np
import pytest
import torch

from conftest import SHARED_MEDIA, tone
from musetalk.checkpoints import unet_config, write_models
from musetalk.distill import (
    LOSS_COLUMNS, DistillData, Distiller, LossWeights, Preparer, TrainOptions, build_students, clip_audio, clip_id,
    main, prepare_dataset, read_log, streaming_windows, train,
)
from musetalk.models import (
    AudioPositionalEncoding, DecoderSwapVAE, MissingWeightsError, find_weights, load_unet, load_unet_folder,
    load_vae, load_vae_folder, load_whisper_encoder,
)
from musetalk.student import feature_channels, feature_pairs, init_from_teacher, student_unet_config, teacher_key

CLIP_FRAMES = 12
CLIP_FPS = 30  # not the server's 25 fps: frame i's audio window is the 25 fps window round(i * 25 / 30)
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


def _write_mkv(path, frames_bgr, pcm16k, audio_start_s):
    """Matroska: MPEG-4 video at 25 fps from t = 0 and 16 kHz mono PCM audio (no
    encoder priming) whose first sample is stamped ``audio_start_s`` seconds."""
    from fractions import Fraction

    with av.open(str(path), "w") as c:
        video = c.add_stream("mpeg4", rate=25)
        video.height, video.width = frames_bgr[0].shape[:2]
        video.pix_fmt = "yuv420p"
        audio = c.add_stream("pcm_s16le", rate=16000)
        audio.layout = "mono"
        for f in frames_bgr:
            c.mux(video.encode(av.VideoFrame.from_ndarray(f, format="bgr24")))
        c.mux(video.encode())
        frame = av.AudioFrame.from_ndarray((pcm16k * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = 16000, Fraction(1, 16000), round(audio_start_s * 16000)
        c.mux(audio.encode(frame))
        c.mux(audio.encode())


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
    _write_clip(videos / "talk.mp4", frames, pcm, fps=CLIP_FPS)
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
    batch = data.batch(3, 0, 16)
    assert batch["latents"].shape == (16, 8, 32, 32) and batch["audio"].shape == (16, 50, AUDIO_DIM)
    assert batch["target"].shape == (16, 4, 32, 32)
    assert torch.equal(batch["latents"], data.batch(3, 0, 16)["latents"])  # a step's batch is reproducible
    assert float(batch["audio"].abs().mean()) > 0  # features of the clip's own audio track
    # some samples are what the server feeds (the frame's own reference: no ground-truth L1 on them),
    # the others take another frame's reference
    own = (batch["latents"][:, 4:] == batch["target"]).flatten(1).all(1)
    same = ~batch["rec"]  # samples flagged as given their own frame for reference
    assert own[same].all() and 0 < int(same.sum()) < 16
    # the others take another frame's reference (one that looks the same is possible: the
    # synthetic clip used without ../shared repeats frames)
    assert int(own[batch["rec"]].sum()) < int(batch["rec"].sum())
    assert (DistillData(data_dir, same_reference=1.0).batch(3, 0, 4)["latents"][:, 4:]
            == data.batch(3, 0, 4)["target"]).all()
    # each frame of the 30 fps clip has the server's streaming window of its time (25 fps frame i * 25 / 30)
    (cid,) = [c for c, e in manifest["clips"].items() if e["status"] == "ok"]
    assert ok["fps"] == CLIP_FPS
    preparer = Preparer(None, load_whisper_encoder(find_weights(workdir / "models")), "v15", 10)
    track = clip_audio(workdir / "videos" / "talk.mp4")
    assert track.start == 0 and ok["audio_delay_ms"] == 0  # both streams start at 0
    pcm = track.pcm
    windows = streaming_windows(preparer.extractor(), pcm, -(-len(pcm) // 640))
    stored = np.load(data_dir / "clips" / cid / "audio.npy").astype(np.float32)
    want = windows[np.round(np.arange(CLIP_FRAMES) * 25 / CLIP_FPS).astype(int)]
    np.testing.assert_allclose(stored, want, rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored[-1], windows[CLIP_FRAMES - 1], rtol=2e-3, atol=2e-3)  # not frame-for-frame
    # a second run after an interruption (the noface clip's entry never written, a half-written
    # clip folder left) with a video deleted since: only the missing clip is prepared again, and
    # the deleted video's clip is dropped (not trained on)
    stamp = {p.name: p.stat().st_mtime_ns for p in (data_dir / "clips").rglob("*.npy")}
    skipped_id = next(c for c, e in manifest["clips"].items() if e["status"] == "skipped")
    gone = dict(manifest["clips"][cid], source=str(workdir / "videos" / "deleted.mp4"))
    interrupted = {**manifest, "clips": {cid: manifest["clips"][cid], "deleted-0123abcd": gone}}
    (data_dir / "manifest.json").write_text(json.dumps(interrupted))
    shutil.copytree(data_dir / "clips" / cid, data_dir / "clips" / "deleted-0123abcd")
    (data_dir / "clips" / f".{skipped_id}.tmp").mkdir()
    assert main(["--videos", str(workdir / "videos"), "--models_dir", str(workdir / "models"),
                 "--out", str(workdir / "out"), "--prepare_only"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (data_dir / "clips").rglob("*.npy")} == stamp
    assert sorted(p.name for p in (data_dir / "clips").iterdir()) == [cid]
    again = json.loads((data_dir / "manifest.json").read_text())
    assert again["clips"][cid] == manifest["clips"][cid] and set(again["clips"]) == set(manifest["clips"])
    assert again["clips"][skipped_id]["reason"] == manifest["clips"][skipped_id]["reason"]
    assert again["counts"] == {"ok": 1, "skipped": 1}


def test_clip_ids_of_symlinked_videos_and_what_the_data_cache_key_covers(workdir, tmp_path, teacher):
    # a symlinked video is named by its link (its target may lie anywhere)
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(workdir / "videos" / "talk.mp4", videos / "linked.mp4")
    assert clip_id(videos / "linked.mp4", videos).startswith("linked-")
    # the cache key changes with the feature extractor's settings and the VAE encoder
    whisper = load_whisper_encoder(find_weights(workdir / "models"))
    base = Preparer(teacher[1], whisper, "v15", 10)
    assert Preparer(teacher[1], whisper, "v15", 10, silence_tokens=8).inputs() != base.inputs()
    assert Preparer(teacher[1], whisper, "v15", 10, left_context_ms=400).inputs() != base.inputs()
    other_vae = load_vae(find_weights(workdir / "models"))
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.mul_(1.5)
    assert Preparer(other_vae, whisper, "v15", 10).inputs()["vae"] != base.inputs()["vae"]


def test_an_audio_track_starting_after_the_video_is_aligned_by_the_streams_times(workdir, tmp_path, teacher):
    """The same scene muxed twice: both streams from t = 0, and with the audio track
    starting 200 ms after the first frame (its first 200 ms, silence, cut off; the rest
    at the same time as before). Every frame gets the same audio window from both;
    in the second the frames before the audio starts are not trained on."""
    delay, burst = 0.2, 8  # s; the frame at which a 60 ms tone sounds (0.32 s, 0.12 s into the delayed track)
    frames, _ = _talking_clip()
    pcm = np.zeros(CLIP_FRAMES * 640, np.float32)
    pcm[burst * 640 : burst * 640 + 960] = tone(0.06, freq=440.0, level=0.8)
    (tmp_path / "videos").mkdir()
    _write_mkv(tmp_path / "videos" / "together.mkv", frames, pcm, 0.0)
    _write_mkv(tmp_path / "videos" / "delayed.mkv", frames, pcm[round(delay * 16000) :], delay)
    paths = find_weights(workdir / "models")
    manifest = prepare_dataset(tmp_path / "videos", tmp_path / "data",
                               Preparer(teacher[1], load_whisper_encoder(paths), "v15", 10))
    assert manifest["counts"] == {"ok": 2, "skipped": 0}
    clips = {e["source"].rsplit("/", 1)[1]: (cid, e) for cid, e in manifest["clips"].items()}
    folder = {name: tmp_path / "data" / "clips" / cid for name, (cid, _) in clips.items()}
    together, delayed = ({"audio": np.load(folder[name] / "audio.npy").astype(np.float32),
                          "valid": np.load(folder[name] / "valid.npy")} for name in ("together.mkv", "delayed.mkv"))
    first = round(delay * 25)  # the first frame with audio in the delayed clip
    assert not np.allclose(together["audio"][burst], together["audio"][2], rtol=2e-3, atol=2e-3)  # the tone shows
    np.testing.assert_allclose(delayed["audio"][first:], together["audio"][first:], rtol=2e-3, atol=2e-3)
    assert not delayed["valid"][:first].any() and (delayed["valid"][first:] == together["valid"][first:]).all()
    assert together["valid"][burst] and delayed["valid"][burst]
    assert abs(clips["delayed.mkv"][1]["audio_delay_ms"] - 1000 * delay) <= 20  # one 20 ms feature step
    assert abs(clips["together.mkv"][1]["audio_delay_ms"]) <= 20


def test_another_vae_prepares_the_data_again(workdir, tmp_path):
    """The cached latents are the VAE's: data prepared with one is not reused with another."""
    paths = find_weights(workdir / "models")
    whisper = load_whisper_encoder(paths)
    shutil.copytree(workdir / "out" / "data", tmp_path / "data")
    (tmp_path / "videos").mkdir()
    os.symlink(workdir / "videos" / "talk.mp4", tmp_path / "videos" / "talk.mp4")
    (cid,) = os.listdir(tmp_path / "data" / "clips")
    before = np.load(tmp_path / "data" / "clips" / cid / "latents.npy")
    same = Preparer(load_vae(paths), whisper, "v15", 10)
    assert prepare_dataset(tmp_path / "videos", tmp_path / "data", same)["clips"][cid]["status"] == "ok"
    assert np.array_equal(np.load(tmp_path / "data" / "clips" / cid / "latents.npy"), before)  # reused
    other_vae = load_vae(paths)
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.mul_(1.5)
    prepare_dataset(tmp_path / "videos", tmp_path / "data", Preparer(other_vae, whisper, "v15", 10))
    after = np.load(tmp_path / "data" / "clips" / cid / "latents.npy")
    assert after.shape == before.shape and not np.allclose(after, before, atol=1e-3)


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
    student, tiny, report = build_students(unet, config, "cpu", True, True, tiny_size="tiny", width=width)
    return Distiller(unet, student, vae, tiny, AudioPositionalEncoding(AUDIO_DIM), config, weights), report


def test_every_distillation_loss_falls_on_a_fixed_batch(workdir, teacher, tmp_path):
    distiller, report = _distiller(teacher)
    assert report["unet_init"]["copied"] > 0.9 * report["unet_init"]["total"]  # BK-SDM init from the teacher
    data = _FixedCrop(DistillData(workdir / "out" / "data"), teacher[0], distiller.pe)
    opts = TrainOptions(steps=STEPS, batch_size=2, lr=1e-3, vae_lr=3e-3, save_every=1000)
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


class _Small:
    """Real varying batches, cropped to 8x8 latents for speed."""

    def __init__(self, data_dir):
        self.data = DistillData(data_dir)

    def batch(self, step, micro, batch_size):
        b = self.data.batch(step, micro, batch_size)
        return {**b, "latents": b["latents"][:, :, 16:24, 12:20], "target": b["target"][:, :, 16:24, 12:20]}


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_resuming_from_a_checkpoint_continues_the_same_loss_curve(workdir, teacher, tmp_path, width):
    """Also for a narrower student, whose feature KD goes through trained 1x1 projections."""
    Small = lambda: _Small(workdir / "out" / "data")  # noqa: E731

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


def test_no_resume_sets_another_run_aside_and_resume_skips_unfinished_checkpoints(workdir, teacher, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-0000050").mkdir(parents=True)  # another run's, further along
    (out / "checkpoints" / "step-0000050" / "trainer.pt").write_bytes(b"an earlier run")
    (out / "losses.csv").write_text(",".join(LOSS_COLUMNS) + "\n50" + "," * (len(LOSS_COLUMNS) - 1) + "\n")
    data, opts = _Small(workdir / "out" / "data"), dict(batch_size=1, save_every=1, keep_checkpoints=2)
    distiller, _ = _distiller(teacher)
    train(distiller, data, out, TrainOptions(steps=2, lr=1e-3, vae_lr=2e-3, resume=False, **opts))
    distiller.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in (out / "checkpoints.previous").iterdir()) == ["step-0000050"]
    assert [r["step"] for r in read_log(out / "losses.csv")] == [1, 2]
    assert [r["step"] for r in read_log(out / "losses.previous.csv")] == [50]
    # a save interrupted mid-write is not resumed from; a new learning rate applies from the next step
    (out / "checkpoints" / "step-0000009.tmp").mkdir()
    (out / "checkpoints" / "step-0000009.tmp" / "trainer.pt").write_bytes(b"trunc")
    distiller, _ = _distiller(teacher)
    result = train(distiller, data, out, TrainOptions(steps=3, lr=5e-4, vae_lr=1e-3, **opts))
    distiller.close()
    assert result["start_step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    rows = read_log(out / "losses.csv")
    assert [(r["lr"], r["vae_lr"]) for r in rows] == [(1e-3, 2e-3), (1e-3, 2e-3), (5e-4, 1e-3)]
    # an unreadable checkpoint is a clear error, not a traceback from torch.load
    (out / "checkpoints" / "step-0000003" / "trainer.pt").write_bytes(b"trunc")
    distiller, _ = _distiller(teacher)
    with pytest.raises(ValueError, match="step-0000003 is unreadable"):
        train(distiller, data, out, TrainOptions(steps=4, **opts))
    distiller.close()


def test_gradient_accumulation_adds_up_to_the_whole_batch(workdir, teacher, tmp_path):
    """One step of 4 samples = one step of 2 x 2 micro-batches of the same samples (losses
    and gradients), with some samples out of the ground-truth L1 (their own reference)."""
    data = _Small(workdir / "out" / "data")
    whole = data.batch(1, 0, 4)
    assert 0 < int(whole["rec"].sum()) < 4

    class Split:
        def batch(self, step, micro, batch_size):
            return {k: v[2 * micro : 2 * micro + batch_size] for k, v in whole.items()}

    rows = []
    for name, batch_size, accum in (("whole", 4, 1), ("split", 2, 2)):
        distiller, _ = _distiller(teacher)
        train(distiller, Split(), tmp_path / name, TrainOptions(steps=1, batch_size=batch_size, grad_accum=accum,
                                                                save_every=10))
        distiller.close()
        rows.append(read_log(tmp_path / name / "losses.csv")[0])
    for key in ("out_kd", "feat_kd", "rec_l1", "vae_l1", "unet_grad_norm", "vae_grad_norm"):
        assert rows[0][key] > 0 and rows[1][key] == pytest.approx(rows[0][key], rel=1e-4), key


def test_student_blocks_start_from_the_teacher_blocks_bk_sdm_tiny_names():
    """BK-SDM-Tiny's initialisation (Nota-NetsPresso/BK-SDM, src/kd_train_text_to_image.py,
    copy_weight_from_teacher "bk_tiny"): student up stage k <- teacher up stage k + 1, its pairs
    0 and 1 <- the teacher's 0 and 2; down stages keep their pair 0; no mid-block."""
    sd15 = unet_config("full")
    for student, teacher in [
        ("up_blocks.0.resnets.0.conv1.weight", "up_blocks.1.resnets.0.conv1.weight"),
        ("up_blocks.0.resnets.1.conv1.weight", "up_blocks.1.resnets.2.conv1.weight"),
        ("up_blocks.0.attentions.1.proj_in.weight", "up_blocks.1.attentions.2.proj_in.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
        ("up_blocks.1.resnets.1.conv_shortcut.bias", "up_blocks.2.resnets.2.conv_shortcut.bias"),
        ("up_blocks.2.attentions.0.norm.weight", "up_blocks.3.attentions.0.norm.weight"),
        ("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
         "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
        ("down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.0.conv1.weight"),
        ("down_blocks.2.attentions.0.proj_out.weight", "down_blocks.2.attentions.0.proj_out.weight"),
        ("down_blocks.1.downsamplers.0.conv.weight", "down_blocks.1.downsamplers.0.conv.weight"),
        ("conv_in.weight", "conv_in.weight"), ("time_embedding.linear_1.weight", "time_embedding.linear_1.weight"),
    ]:
        assert teacher_key(student, sd15) == teacher, student
    # on real (tiny) tensors: the dropped middle pair's weights go nowhere, the kept ones are copied
    from diffusers import UNet2DConditionModel

    # SD's layout: two pairs per stage, the innermost two stages equally wide (so the first kept
    # up stage sees the channels its teacher stage saw)
    config = dict(unet_config("tiny"), layers_per_block=2, block_out_channels=[32, 64, 64])
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(config)
    student = UNet2DConditionModel.from_config(student_unet_config(config))
    report = init_from_teacher(student, teacher.state_dict(), config)
    assert report["kept_random"] == [] and report["copied"] == report["total"]
    assert student.mid_block is None and not any(k.startswith("mid_block") for k in student.state_dict())
    t, s = teacher.state_dict(), student.state_dict()
    for s_key, t_key in (("up_blocks.0.resnets.1.conv1.weight", "up_blocks.1.resnets.2.conv1.weight"),
                         ("up_blocks.1.attentions.1.proj_out.weight", "up_blocks.2.attentions.2.proj_out.weight"),
                         ("down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight")):
        assert torch.equal(s[s_key], t[t_key]), s_key
    assert not torch.equal(s["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.1.resnets.1.conv1.weight"])


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
    # the student records its teacher's version: served with the other version's crops it is refused
    assert json.loads((students / "unet" / "musetalk_student.json").read_text()) == {"teacher_version": "v15"}
    load_unet_folder(students / "unet", version="v1.5")
    with pytest.raises(MissingWeightsError, match="distilled from MuseTalk v15, but v1 is in use"):
        load_unet_folder(students / "unet", version="v1")
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        load_unet_folder(workdir / "videos")
    with pytest.raises(MissingWeightsError, match="not a MuseTalk UNet"):
        load_unet_folder(students / "vae")  # an AutoencoderTiny config


def test_students_serve_the_end_to_end_musetalk_pipeline(workdir, students):
    """The server with --musetalk_unet/--musetalk_vae passes test_musetalk_e2e's own
    end-to-end check (faces generated and pasted inside the crop box, idle untouched),
    from a models folder without the teacher UNet: the student is what runs."""
    import test_musetalk_e2e as e2e
    from client import ServerProcess

    models = workdir / "served_models"
    shutil.copytree(workdir / "models", models, ignore=shutil.ignore_patterns("musetalkV15"))
    srv = ServerProcess(workdir, "--model", "musetalk", "--models_dir", str(models),
                        "--latency_mode", "balanced", "--parsing", "landmarks",
                        "--musetalk_unet", str(students / "unet"), "--musetalk_vae", str(students / "vae"))
    srv.workdir = workdir
    try:
        e2e.test_musetalk_pipeline_pastes_faces_inside_the_crop_box(srv)
    finally:
        srv.stop()
    assert f"(student from {students / 'unet'})" in srv.log.read_text()


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
