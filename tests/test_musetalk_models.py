"""Tests for musetalk/models.py: loading tiny checkpoints in the released formats (CPU)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musetalk import models as M  # noqa: E402
from musetalk.checkpoints import (  # noqa: E402
    write_models,
    write_unet,
    write_vae,
    write_whisper,
    write_whisper_hf,
)

AUDIO_DIM = 32  # tiny Whisper width = tiny UNet cross_attention_dim


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A complete tiny models/ folder (v1.5 and v1.0 UNets, sd-vae, whisper/tiny.pt); read-only."""
    root = tmp_path_factory.mktemp("models")
    write_models(root, "v15", audio_dim=AUDIO_DIM)
    write_unet(root, "v1", audio_dim=AUDIO_DIM)
    return root


@pytest.fixture
def models_dir(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny folder that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "models"))


def _same_weights(module: torch.nn.Module, state: dict) -> bool:
    loaded = module.state_dict()
    if loaded.keys() != state.keys():
        return False
    return all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)


# -- UNet ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "folder", "weights"),
    [
        ("v15", "musetalkV15", "unet.pth"),
        ("v1.5", "musetalkV15", "unet.pth"),
        ("v1", "musetalk", "pytorch_model.bin"),
        ("v10", "musetalk", "pytorch_model.bin"),
        ("v1.0", "musetalk", "pytorch_model.bin"),
    ],
    ids=["v15", "v1.5", "v1", "v10", "v1.0"],
)
def test_find_weights_version_spellings(tiny_dir, version, folder, weights):
    paths = M.find_weights(tiny_dir, version)
    assert paths.version == ("v15" if folder == "musetalkV15" else "v1")
    assert paths.unet_config == tiny_dir / folder / "musetalk.json"
    assert paths.unet_weights == tiny_dir / folder / weights
    assert paths.vae_dir == tiny_dir / "sd-vae"


@pytest.mark.parametrize("version", ["v15", "v1"])
def test_unet_loads_released_files_and_runs(tiny_dir, version):
    paths = M.find_weights(tiny_dir, version)
    unet = M.load_unet(paths)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert _same_weights(unet, torch.load(paths.unet_weights, weights_only=True))
    with torch.no_grad():
        out = unet(torch.randn(2, 8, 32, 32), 0, encoder_hidden_states=torch.randn(2, 50, AUDIO_DIM)).sample
    assert out.shape == (2, 4, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_released_configs_build_the_documented_architecture():
    """The released musetalk.json and sd-vae-ft-mse config, as the installed diffusers
    reads them, give MuseTalk's ~850M-parameter UNet (8 -> 4 channels, 384-wide
    cross-attention) and the ~84M-parameter SD VAE (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from musetalk.checkpoints import RELEASED_UNET_CONFIG, RELEASED_VAE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(RELEASED_UNET_CONFIG)
        vae = AutoencoderKL.from_config(RELEASED_VAE_CONFIG)
    assert 845e6 < sum(p.numel() for p in unet.parameters()) < 855e6
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 85e6
    assert unet.conv_in.in_channels == M.UNET_IN_CHANNELS and unet.conv_out.out_channels == M.UNET_OUT_CHANNELS
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 384
    latents = torch.empty(2, 8, 32, 32, device="meta")
    out = unet(latents, 0, encoder_hidden_states=torch.empty(2, 50, 384, device="meta")).sample
    assert tuple(out.shape) == (2, 4, 32, 32)
    assert tuple(vae.decode(out).sample.shape) == (2, 3, 256, 256)


def test_unet_state_dict_with_wrong_key_names_it(models_dir):
    weights = models_dir / "musetalkV15" / "unet.pth"
    state = torch.load(weights, weights_only=True)
    state["conv_in.weight_renamed"] = state.pop("conv_in.weight")
    torch.save(state, weights)
    paths = M.find_weights(models_dir)  # the file itself is well formed
    with pytest.raises(M.MissingWeightsError) as err:
        M.load_unet(paths)
    message = str(err.value)
    assert "conv_in.weight_renamed" in message and "conv_in.weight" in message
    assert "1 missing keys" in message and "1 unexpected keys" in message
    assert "1 missing keys" in err.value.problems[weights]


def test_unet_config_and_weights_of_different_shapes(models_dir):
    config_path = models_dir / "musetalkV15" / "musetalk.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 16
    config["unknown_future_key"] = 1  # tolerated: diffusers ignores extra keys
    config_path.write_text(json.dumps(config))
    with pytest.raises(M.MissingWeightsError, match=r"shape mismatches \(e\.g\. .*attn2\.to_k\.weight"):
        M.load_unet(M.find_weights(models_dir))


def test_unet_config_that_is_not_musetalk(models_dir):
    config_path = models_dir / "musetalkV15" / "musetalk.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(M.MissingWeightsError, match="not a MuseTalk UNet config"):
        M.load_unet(M.find_weights(models_dir))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "truncated or corrupt"),  # first half of the real file
        (b"\x00garbage" * 50, "not a PyTorch checkpoint"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3400000000\n", "git-lfs pointer"),
        (b"", "empty file"),
    ],
    ids=["truncated", "garbage", "lfs-pointer", "empty"],
)
def test_malformed_unet_file_is_reported_by_find_weights(models_dir, content, reason):
    weights = models_dir / "musetalkV15" / "unet.pth"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(M.MissingWeightsError) as err:
        M.find_weights(models_dir)
    assert reason in err.value.problems[weights]
    assert f"{weights}  [bad: " in str(err.value) and reason in str(err.value)
    assert err.value.missing == []


def test_unreadable_checkpoint_fails_at_load_with_full_listing(models_dir):
    weights = models_dir / "musetalkV15" / "unet.pth"
    with zipfile.ZipFile(weights, "w") as z:  # a valid zip, but not a torch archive
        z.writestr("notes.txt", "hello")
    paths = M.find_weights(models_dir)
    with pytest.raises(M.MissingWeightsError, match="torch.load failed") as err:
        M.load_unet(paths)
    assert str(models_dir / "sd-vae" / "config.json") in str(err.value)  # whole layout listed
    torch.save([1, 2, 3], weights)
    with pytest.raises(M.MissingWeightsError, match="not a plain state dict"):
        M.load_unet(M.find_weights(models_dir))


def test_invalid_musetalk_json(models_dir):
    (models_dir / "musetalkV15" / "musetalk.json").write_text("{not json")
    with pytest.raises(M.MissingWeightsError, match="invalid JSON"):
        M.find_weights(models_dir)


# -- VAE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["sd-vae", "sd-vae-ft-mse"])
def test_vae_with_old_attention_keys_loads_and_decodes(tmp_path, tiny_dir, folder):
    models_dir = Path(shutil.copytree(tiny_dir, tmp_path / "models", ignore=shutil.ignore_patterns("sd-vae")))
    write_vae(models_dir / folder, old_attention_keys=True)
    saved = torch.load(models_dir / folder / "diffusion_pytorch_model.bin", weights_only=True)
    assert "encoder.mid_block.attentions.0.query.weight" in saved
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in saved
    assert not any(".to_q." in k for k in saved)

    paths = M.find_weights(models_dir)
    assert paths.vae_dir == models_dir / folder
    vae = M.load_vae(paths)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    loaded = vae.state_dict()
    block = "mid_block.attentions.0"
    assert torch.equal(loaded[f"encoder.{block}.to_q.weight"], saved[f"encoder.{block}.query.weight"])
    assert torch.equal(loaded[f"decoder.{block}.to_out.0.bias"], saved[f"decoder.{block}.proj_attn.bias"])
    with torch.no_grad():
        image = vae.decode(torch.randn(2, 4, 32, 32)).sample
    assert image.shape == (2, 3, 256, 256) and torch.isfinite(image).all()


def test_vae_safetensors_is_preferred(models_dir):
    from safetensors.torch import save_file

    folder = models_dir / "sd-vae"
    state = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    state = {k: v + 1 if k == "decoder.conv_out.bias" else v for k, v in state.items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    paths = M.find_weights(models_dir)
    assert paths.vae_weights.name == "diffusion_pytorch_model.safetensors"
    assert torch.equal(M.load_vae(paths).state_dict()["decoder.conv_out.bias"], state["decoder.conv_out.bias"])


def test_vae_missing_key_is_an_error(models_dir):
    weights = models_dir / "sd-vae" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    del state["decoder.conv_out.bias"]
    torch.save(state, weights)
    with pytest.raises(M.MissingWeightsError, match=r"missing_keys: decoder\.conv_out\.bias"):
        M.load_vae(M.find_weights(models_dir))


# -- Whisper ------------------------------------------------------------------------------


def test_whisper_encoder_from_tiny_pt(tiny_dir):
    checkpoint = torch.load(tiny_dir / "whisper" / "tiny.pt", weights_only=True)
    assert set(checkpoint["dims"]) == {
        "n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
        "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer",
    }
    assert any(k.startswith("decoder.") for k in checkpoint["model_state_dict"])
    paths = M.find_weights(tiny_dir)
    assert paths.whisper == tiny_dir / "whisper" / "tiny.pt" and paths.whisper_config is None
    encoder = M.load_whisper_encoder(paths)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    full = checkpoint["model_state_dict"]
    expected = {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.")}
    assert _same_weights(encoder, expected)
    with torch.no_grad():
        out = encoder(torch.randn(1, 80, 3000))
    assert out.shape == (1, 1500, AUDIO_DIM)


def test_whisper_encoder_from_transformers_folder(tmp_path, tiny_dir):
    openai = M.load_whisper_encoder(M.find_weights(tiny_dir))
    models_dir = Path(shutil.copytree(tiny_dir, tmp_path / "models", ignore=shutil.ignore_patterns("whisper")))
    write_whisper_hf(models_dir / "whisper", n_state=AUDIO_DIM)
    paths = M.find_weights(models_dir)
    assert paths.whisper_config == models_dir / "whisper" / "config.json"
    assert paths.whisper == models_dir / "whisper" / "pytorch_model.bin"
    hf = M.load_whisper_encoder(paths)
    # Same seeded weights; tiny.pt holds them in float16 like the release.
    reference = openai.state_dict()
    assert reference.keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert torch.equal(value.half().float(), reference[key]), key
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert torch.allclose(hf(mel), openai(mel), atol=2e-2)

    from safetensors.torch import save_file  # the folder may hold model.safetensors instead

    bin_path = models_dir / "whisper" / "pytorch_model.bin"
    save_file(torch.load(bin_path, weights_only=True), models_dir / "whisper" / "model.safetensors")
    bin_path.unlink()
    paths = M.find_weights(models_dir)
    assert paths.whisper.name == "model.safetensors"
    assert _same_weights(M.load_whisper_encoder(paths), hf.state_dict())


def test_whisper_checkpoint_missing_encoder_key(models_dir):
    path = models_dir / "whisper" / "tiny.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_state_dict"]["encoder.ln_post.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(M.MissingWeightsError, match=r"missing keys \(e\.g\. ln_post\.weight\)"):
        M.load_whisper_encoder(M.find_weights(models_dir))


# -- layout errors ------------------------------------------------------------------------


def test_empty_dir_names_every_expected_path(tmp_path):
    with pytest.raises(M.MissingWeightsError) as err:
        M.find_weights(tmp_path / "models")
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    root = (tmp_path / "models").resolve()
    expected = [
        "musetalkV15/musetalk.json", "musetalkV15/unet.pth",
        "sd-vae/config.json", "sd-vae/diffusion_pytorch_model.bin", "sd-vae/diffusion_pytorch_model.safetensors",
        "sd-vae-ft-mse/config.json", "sd-vae-ft-mse/diffusion_pytorch_model.bin",
        "whisper/tiny.pt", "whisper/config.json", "whisper/pytorch_model.bin",
        "face-parse-bisent/79999_iter.pth", "face-parse-bisent/resnet18-5c106cde.pth",
    ]
    for rel in expected:
        assert f"{root / rel}  [missing]" in message, rel
    assert "download_weights.sh" in message and "huggingface.co/TMElyralab/MuseTalk" in message
    assert root / "musetalkV15" / "unet.pth" in err.value.missing
    assert root / "face-parse-bisent" / "79999_iter.pth" not in err.value.missing  # optional


def test_one_missing_file_is_singled_out(models_dir):
    (models_dir / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(M.MissingWeightsError) as err:
        M.find_weights(models_dir, "v1.5")
    assert err.value.missing == [models_dir / "musetalkV15" / "unet.pth"]
    message = str(err.value)
    assert "[MISSING] UNet v1.5" in message and "[ok] VAE" in message and "[ok] Whisper-tiny" in message
    assert f"{models_dir / 'musetalkV15' / 'musetalk.json'}  [ok]" in message
    M.find_weights(models_dir, "v1")  # the v1.0 UNet is still complete


def test_face_parsing_files_are_optional_but_checked(models_dir):
    assert M.find_weights(models_dir).face_parse is None
    folder = models_dir / "face-parse-bisent"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "79999_iter.pth")
    paths = M.find_weights(models_dir)
    assert paths.face_parse == folder / "79999_iter.pth" and paths.face_parse_resnet is None
    (folder / "resnet18-5c106cde.pth").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(M.MissingWeightsError, match=r"\[BAD\] face-parsing backbone"):
        M.find_weights(models_dir)


def test_unknown_version():
    with pytest.raises(ValueError, match="unknown MuseTalk version"):
        M.normalize_version("v2")


# -- positional encoding ------------------------------------------------------------------


def test_positional_encoding_values():
    pe = M.positional_encoding(50, 384)
    assert pe.shape == (50, 384) and pe.dtype == torch.float32
    assert torch.all(pe[0, 0::2] == 0) and torch.all(pe[0, 1::2] == 1)
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert pe[1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-7)
    # p = 7, i = 10: angle 7 / 10000^(20/384)
    angle = 7 / 10000 ** (20 / 384)
    assert pe[7, 20].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert pe[7, 21].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_audio_positional_encoding_module():
    module = M.AudioPositionalEncoding(d_model=8, max_len=20)
    assert module.state_dict() == {}  # not a weight
    x = torch.randn(3, 10, 8)
    assert torch.equal(module(x), x + M.positional_encoding(10, 8)[None])
    half = module.to(torch.float16)(x.half())
    assert half.dtype == torch.float16
    with pytest.raises(ValueError):
        module(torch.zeros(1, 21, 8))
    with pytest.raises(ValueError):
        module(torch.zeros(1, 10, 6))


# -- everything together ------------------------------------------------------------------


def test_load_models_on_cpu_uses_fp32(tiny_dir):
    models = M.load_models(tiny_dir)
    assert models.device == torch.device("cpu") and models.dtype == torch.float32
    assert models.version == "v15" and models.paths.models_dir == tiny_dir.resolve()
    for module in (models.unet, models.vae, models.whisper):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert models.pe.d_model == AUDIO_DIM
    with torch.no_grad():
        tokens = models.pe(torch.randn(1, 50, AUDIO_DIM))
        latent = models.unet(torch.randn(1, 8, 32, 32), 0, encoder_hidden_states=tokens).sample
        assert models.vae.decode(latent / 0.18215).sample.shape == (1, 3, 256, 256)


def test_load_models_explicit_dtype(tiny_dir):
    models = M.load_models(tiny_dir, "v1", device="cpu", dtype=torch.bfloat16)
    assert models.version == "v1" and models.dtype == torch.bfloat16
    assert {p.dtype for p in models.unet.parameters()} == {torch.bfloat16}
    assert models.pe(torch.zeros(1, 50, AUDIO_DIM, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_half_precision_models_run_the_whole_frame_path(tiny_dir):
    """The server's half-precision path (fp16 on CUDA; bf16 stands in on the CPU):
    streaming Whisper features, PE, UNet and VAE decode all run and stay finite.
    The Whisper encoder stays float32 (openai-whisper's LayerNorm computes in
    float32 with its own weights)."""
    from musetalk.audio_features import StreamingFeatureExtractor

    models = M.load_models(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in models.whisper.parameters()} == {torch.float32}
    extractor = StreamingFeatureExtractor(models.whisper, models.version)
    rng = np.random.default_rng(0)
    span = (0.1 * rng.standard_normal(extractor.span_samples(4))).astype(np.float32)
    windows = extractor.windows(span, 4, 10)
    assert windows.shape == (4, 50, AUDIO_DIM) and np.isfinite(windows).all()
    with torch.no_grad():
        tokens = models.pe(torch.from_numpy(windows).to(models.dtype))
        latent = models.unet(torch.randn(4, 8, 32, 32, dtype=models.dtype), 0, encoder_hidden_states=tokens).sample
        image = models.vae.decode(latent / 0.18215).sample
    assert image.dtype == torch.bfloat16 and torch.isfinite(image.float()).all()


def test_load_models_rejects_whisper_of_another_width(models_dir):
    write_whisper(models_dir / "whisper" / "tiny.pt", n_state=16, n_head=2)
    with pytest.raises(M.MissingWeightsError, match="cross_attention_dim 32"):
        M.load_models(models_dir)


def test_package_import_is_light():
    code = "import sys, musetalk; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
