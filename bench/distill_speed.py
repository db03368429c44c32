"""Distilled MuseTalk vs the released architecture: UNet and VAE decoder, side by side.

Teacher UNet (musetalk.json) vs the BK-SDM-Tiny student (musetalk/student.py) and a
narrower one (``--narrow_width``, ``python -m musetalk.distill --student_width``), and
the SD VAE decoder (sd-vae-ft-mse) vs the TAESD decoder (diffusers AutoencoderTiny),
all at full size with random weights (the FLOPs and memory traffic of the real
models; speed does not depend on the weights' values). Per model: parameters,
GMACs per frame (torch.utils.flop_counter.FlopCounterMode on the meta device,
FLOPs / 2), ms per frame and frames/s per batch size; speed-ups student vs teacher.
The models of a group are timed interleaved (teacher, students, then the reverse
order) and each figure is a median, so load from other processes hits all alike.
Both UNets run at timestep 0 with the precomputed time embedding, as the engine does.

    .venv/bin/python bench/distill_speed.py --out bench/results/distill-cpu.json      # CPU: fp32, batch 1,4
    python3 bench/distill_speed.py --device cuda --out distill-gpu.json               # GPU: fp16, batch 4,16
    .venv/bin/python bench/distill_speed.py --tiny                                    # smoke run (tiny configs)

Targets (issue #12): the student UNet >= 3x faster than the teacher at batch 4, the
tiny decoder >= 10x faster than the SD decoder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from musetalk.checkpoints import unet_config, vae_config  # noqa: E402
from musetalk.inference import VAE_SCALE, freeze_time_embedding  # noqa: E402
from musetalk.student import student_unet_config, tiny_vae_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = {"unet_speedup_batch4": 3.0, "decoder_speedup_batch4": 10.0}
LATENT = (32, 32)  # MuseTalk's latent size (256 px faces)


def _unet_step(config: dict, device, dtype, meta: bool = False):
    """(model, step(batch_size) -> callable) for a UNet of ``config`` at t = 0."""
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    if not meta:
        unet = torch.nn.Module.to(unet, device=device, dtype=dtype)
        freeze_time_embedding(unet, device, dtype)
    dev = torch.device("meta") if meta else device
    t0 = torch.zeros(1, device=dev, dtype=torch.long)
    width = config["cross_attention_dim"]

    def step(b):
        latents = torch.randn(b, 8, *LATENT, device=dev, dtype=dtype) if not meta else torch.empty(b, 8, *LATENT, device=dev)
        audio = torch.randn(b, 50, width, device=dev, dtype=dtype) if not meta else torch.empty(b, 50, width, device=dev)
        return lambda: unet(latents, t0, encoder_hidden_states=audio).sample

    return unet, step


def _decoder_step(kind: str, config: dict, device, dtype, meta: bool = False):
    """(decoder modules for the parameter count, step(batch_size) -> callable)."""
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        vae = (AutoencoderKL if kind == "sd" else AutoencoderTiny).from_config(config).eval().requires_grad_(False)
    if not meta:
        vae = torch.nn.Module.to(vae, device=device, dtype=dtype)
    dev = torch.device("meta") if meta else device
    parts = [vae.decoder] + ([vae.post_quant_conv] if kind == "sd" else [])

    def step(b):
        z = torch.empty(b, 4, *LATENT, device=dev) if meta else torch.randn(b, 4, *LATENT, device=dev, dtype=dtype)
        if kind == "sd":
            return lambda: vae.decode(z / VAE_SCALE).sample
        return lambda: vae.decode(z).sample  # TAESD takes scaled latents

    return parts, step


def _gmacs_per_frame(step) -> float:
    """GMACs of one frame: FlopCounterMode on meta tensors (no compute), FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        step(1)()
    return counter.get_total_flops() / 2 / 1e9


def _call_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0


def _count(modules) -> float:
    modules = modules if isinstance(modules, list) else [modules]
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 2)


# Each group: the released model first, then its students.
GROUPS = {"unet": ("teacher_unet", "student_unet", "student_unet_narrow"), "decoder": ("sd_decoder", "tiny_decoder")}


def run(args) -> dict:
    """Build each pair, then time teacher and student calls interleaved (teacher,
    student, student, teacher, ...) so that load from other processes hits both
    alike; per batch size: median ms per frame of each, and the median of the
    per-repetition speed-ups (teacher ms / student ms of adjacent calls)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batches = [int(x) for x in args.batch.split(",")]
    size = "tiny" if args.tiny else "full"
    teacher_cfg = unet_config(size)
    builders = {
        "teacher_unet": lambda meta=False: _unet_step(teacher_cfg, device, dtype, meta),
        "student_unet": lambda meta=False: _unet_step(student_unet_config(teacher_cfg), device, dtype, meta),
        "student_unet_narrow": lambda meta=False: _unet_step(student_unet_config(teacher_cfg, args.narrow_width),
                                                             device, dtype, meta),
        "sd_decoder": lambda meta=False: _decoder_step("sd", vae_config(size), device, dtype, meta),
        "tiny_decoder": lambda meta=False: _decoder_step("tiny", tiny_vae_config(size), device, dtype, meta),
    }
    rows, speedup = {}, {}
    for group in args.only.split(","):
        names = GROUPS[group]
        slow = names[0]
        steps = {}
        for name in names:
            meta_model, meta_step = builders[name](meta=True)
            rows[name] = {"params_m": _count(meta_model), "gmacs_per_frame": round(_gmacs_per_frame(meta_step), 2),
                          "ms_per_frame": {}, "frames_per_s": {}}
            steps[name] = builders[name]()[1]
        for name in names[1:]:
            speedup[name] = {}
        for b in batches:
            calls = {name: steps[name](b) for name in names}
            with torch.no_grad():
                for _ in range(args.warmup):
                    for fn in calls.values():
                        fn()
                times = {name: [] for name in names}
                for rep in range(args.iters):
                    for name in (names if rep % 2 == 0 else names[::-1]):
                        times[name].append(_call_ms(calls[name], device) / b)
            for name in names:
                ms = statistics.median(times[name])
                rows[name]["ms_per_frame"][str(b)] = round(ms, 2)
                rows[name]["frames_per_s"][str(b)] = round(1000.0 / ms, 1)
                print(f"batch {b}: {name} {[round(t) for t in times[name]]} ms/frame", file=sys.stderr, flush=True)
            for name in names[1:]:
                speedup[name][str(b)] = round(statistics.median([t / s for t, s in zip(times[slow], times[name])]), 2)
        del steps, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "models": rows,
        "speedup": speedup,
        "targets": TARGETS,
    }
    at4 = "4" if 4 in batches else str(batches[-1])
    target = {"student_unet": "unet", "student_unet_narrow": "unet", "tiny_decoder": "decoder"}
    result["met"] = {name: speedup[name][at4] >= TARGETS[f"{target[name]}_speedup_batch4"] for name in speedup}
    if "student_unet" in rows and "tiny_decoder" in rows:
        result["unet_plus_decoder_ms_per_frame"] = {
            str(b): {who: round(rows[u]["ms_per_frame"][str(b)] + rows[d]["ms_per_frame"][str(b)], 2)
                     for who, u, d in (("teacher", "teacher_unet", "sd_decoder"),
                                       ("student", "student_unet", "tiny_decoder"),
                                       ("student_narrow", "student_unet_narrow", "tiny_decoder")) if u in rows}
            for b in batches}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--batch", help="batch sizes (default: 4,16 on CUDA, 1,4 on the CPU)")
    ap.add_argument("--iters", type=int, help="timed repetitions per batch (default: 20 on CUDA, 3 on the CPU)")
    ap.add_argument("--warmup", type=int, help="untimed repetitions first (default: 3 on CUDA, 1 on the CPU)")
    ap.add_argument("--only", default="unet,decoder", help="pairs to measure: unet, decoder or both")
    ap.add_argument("--narrow_width", type=float, default=0.6,
                    help="channel multiplier of the narrow student (python -m musetalk.distill --student_width)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a smoke run of this script)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    args.batch = args.batch or ("4,16" if gpu else "1,4")
    args.iters = args.iters or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
