"""MuseTalk in half precision against fp32: features, UNet output and decoded faces.

The server runs MuseTalk's UNet and VAE in float16 on CUDA
(``musetalk.models.load_models``' default; the Whisper encoder stays float32).
This loads the same weights twice, in float32 and in the half dtype, on one
device, and runs the same streaming Whisper windows of real speech through both:

- ``unet``: the predicted latents from the same fp32 features, relative L2
  difference, and whether every value is finite;
- ``faces``: the decoded 256x256 faces as uint8, mean and max absolute difference
  and the share of pixels off by more than 8 levels.

Usage::

    python bench/musetalk_fp16_check.py --random full [--half fp16|bf16] [--out r.json]
    python bench/musetalk_fp16_check.py --models_dir models          # released weights
    python bench/musetalk_fp16_check.py --random tiny --device cpu --half bf16   # smoke run

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, load_speech  # noqa: E402
from clock import FRAME_SAMPLES  # noqa: E402
from musetalk.inference import VAE_SCALE  # noqa: E402

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


@torch.inference_mode()
def check(args, models_dir: Path) -> dict:
    import avatar as avatar_mod
    from musetalk.audio_features import StreamingFeatureExtractor
    from musetalk.models import load_models
    from musetalk.prepare import prepare_musetalk

    device = torch.device(args.device)
    full = load_models(models_dir, device=device, dtype=torch.float32)
    half = load_models(models_dir, device=device, dtype=HALF[args.half])
    avatar = avatar_mod.ensure_default_avatar(args.avatars_dir)
    mavatar = prepare_musetalk(avatar, full.vae, version=full.version, parsing=None)

    speech = load_speech(args.speech)
    extractor = StreamingFeatureExtractor(full.whisper, full.version)
    first = args.first_frame
    span = speech[first * FRAME_SAMPLES - extractor.lookbehind_samples:][: extractor.span_samples(args.frames)]
    windows = extractor.windows(span, args.frames, first)

    indices = [k % len(mavatar) for k in range(args.frames)]
    outputs = {}
    for name, m in (("fp32", full), (args.half, half)):
        latents = mavatar.loop_latents(indices, device, m.dtype)
        tokens = m.pe(torch.from_numpy(windows).to(device, m.dtype))
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        pred = m.unet(latents, t0, encoder_hidden_states=tokens).sample
        image = m.vae.decode(pred / VAE_SCALE).sample.float()
        faces = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy().astype(np.int16)
        outputs[name] = (pred.float().cpu(), image.cpu(), faces)
    pred32, image32, faces32 = outputs["fp32"]
    predh, imageh, facesh = outputs[args.half]
    diff = np.abs(faces32 - facesh)
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "half": args.half,
        "weights": args.random and f"random {args.random}" or str(args.models_dir),
        "frames": args.frames,
        "unet": {"rel_l2": round(rel_l2(pred32, predh), 5), "finite": bool(torch.isfinite(predh).all())},
        "image": {"rel_l2": round(rel_l2(image32, imageh), 5), "finite": bool(torch.isfinite(imageh).all())},
        "faces": {"mean_abs": round(float(diff.mean()), 3), "max_abs": int(diff.max()),
                  "share_over_8": round(float((diff > 8).mean()), 5)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--models_dir", type=Path)
    src.add_argument("--random", choices=("tiny", "full"), help="random weights in the released formats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--half", choices=sorted(HALF), default="fp16")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--first_frame", type=int, default=50, help="utterance frame the batch starts at")
    ap.add_argument("--speech", type=Path)
    ap.add_argument("--avatars_dir", type=Path, default=ROOT / "data" / "avatars")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir
        if args.random:
            from musetalk.checkpoints import write_models

            models_dir = Path(tmp) / "models"
            write_models(models_dir, version="v15", size=args.random)
        result = check(args, models_dir)
    emit(result, args.out)


if __name__ == "__main__":
    main()
