"""MuseTalk online-inference throughput: UNet, VAE decode, and both, per batch size.

Full-size architecture with random weights (same FLOPs as the released model:
UNet config of musetalk.json, VAE of sd-vae-ft-mse), so it runs without the
weights. Reports ms per batch, frames/s and peak GPU memory as JSON.

    .venv/bin/python bench/musetalk_throughput.py --dtype fp16 --batch 1,4,8,16,32,64 \\
        [--channels_last] [--sdpa/--no-sdpa] [--compile] [--cuda_graphs] [--out r.json]
    .venv/bin/python bench/musetalk_throughput.py --tiny --device cpu   # smoke run, no GPU

Targets (issue #3, H100): >= 600 frames/s at the best batch size, <= 15 ms for a
batch of 4. Anchors: the reference ~30 fps on an H100; LiveTalking 72 fps on a 4090.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from musetalk.checkpoints import unet_config, vae_config  # noqa: E402
from musetalk.inference import VAE_SCALE, freeze_time_embedding  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(args):
    size = "tiny" if args.tiny else "full"  # full: the released musetalk.json and sd-vae-ft-mse configs
    unet_cfg, vae_cfg = unet_config(size), vae_config(size)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg).eval().requires_grad_(False)
    vae = AutoencoderKL.from_config(vae_cfg).eval().requires_grad_(False)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    unet.to(device, dtype)
    vae.to(device, dtype)
    if not args.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    freeze_time_embedding(unet, device, dtype)
    t0 = torch.zeros(1, device=device, dtype=torch.long)
    audio_dim = unet_cfg["cross_attention_dim"]

    def unet_step(latents, audio):
        return unet(latents, t0, encoder_hidden_states=audio).sample

    def vae_step(z):
        return vae.decode(z / VAE_SCALE).sample

    if args.compile:
        unet_step = torch.compile(unet_step, mode="max-autotune-no-cudagraphs" if not args.cuda_graphs else "max-autotune")
        vae_step = torch.compile(vae_step, mode="max-autotune-no-cudagraphs" if not args.cuda_graphs else "max-autotune")
    return unet_step, vae_step, audio_dim, device, dtype


def timed(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1000.0


def run(args) -> dict:
    unet_step, vae_step, audio_dim, device, dtype = build(args)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        latents = torch.randn(b, 8, 32, 32, device=device, dtype=dtype).to(memory_format=mf)
        audio = torch.randn(b, 50, audio_dim, device=device, dtype=dtype)
        z = torch.randn(b, 4, 32, 32, device=device, dtype=dtype).to(memory_format=mf)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            unet_ms = timed(lambda: unet_step(latents, audio), device, args.iters, args.warmup)
            vae_ms = timed(lambda: vae_step(z), device, args.iters, args.warmup)
            both_ms = timed(lambda: vae_step(unet_step(latents, audio)), device, args.iters, args.warmup)
        row = {
            "batch": b,
            "unet_ms": round(unet_ms, 3), "vae_decode_ms": round(vae_ms, 3), "both_ms": round(both_ms, 3),
            "unet_fps": round(b / unet_ms * 1000, 1), "vae_fps": round(b / vae_ms * 1000, 1),
            "both_fps": round(b / both_ms * 1000, 1),
        }
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    best = max(rows, key=lambda r: r["both_fps"])
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "best": {"batch": best["batch"], "frames_per_s": best["both_fps"]},
        "targets": {"frames_per_s": 600, "batch4_ms": 15},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--batch", default="1,2,4,8,16,32,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--channels_last", action="store_true")
    ap.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                    help="scaled-dot-product attention (diffusers' default processor)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    ap.add_argument("--cuda_graphs", action="store_true", help="with --compile: mode max-autotune (CUDA graphs)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (smoke run on CPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device == "cpu" and args.dtype == "fp16":
        args.dtype = "fp32"
    result = run(args)
    emit(result, args.out)


if __name__ == "__main__":
    main()
