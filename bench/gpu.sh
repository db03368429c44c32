#!/usr/bin/env bash
# MuseTalk's GPU benchmarks on a machine without internet (docs/benchmarks.md).
#
#   bench/gpu.sh fetch            # here, with internet: fill .whl/ and data/avatars/
#   bench/gpu.sh run [STEP ...]   # on the GPU machine, from the repository root
#
# `fetch` downloads the Python 3.12 wheels a GPU image with PyTorch but without
# diffusers / openai-whisper needs, writes .whl/speech16k.npy (real speech, float32
# 16 kHz, from ../shared/media/sun.wav, else espeak) and prepares the built-in
# avatar (its landmarks need dlib, which the GPU machine does not need then).
# Carry .whl and data/avatars to the GPU machine.
#
# `run` installs the wheels into /tmp/site and runs the steps (default: all but
# compile), each writing JSON to $OUT (default bench/results):
#   throughput  bench/musetalk_throughput.py, fp16 and bf16, plain and channels_last
#   compile     bench/musetalk_throughput.py --compile (minutes of autotuning)
#   fp16        bench/musetalk_fp16_check.py: fp16 against fp32, released sizes
#   sessions    bench/musetalk_sessions.py: sessions per GPU, released sizes
#   sessions-compiled   the same with --musetalk_compile reduce-overhead (CUDA graphs)
#   distill     bench/distill_speed.py: teacher vs distilled student UNets, SD vs tiny decoder (fp16, batch 4,16)
# SMOKE=1 runs every step with tiny weights on the CPU (checks this script).
set -uo pipefail
cd "$(dirname "$0")/.."

fetch() {
    set -e
    PY=${PY:-.venv/bin/python}
    mkdir -p .whl
    local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    # pure-Python wheels; the GPU image has torch, numpy, scipy, opencv, tiktoken, numba, tqdm, yaml, prometheus_client
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
        -d .whl "diffusers==$($PY -c 'import diffusers; print(diffusers.__version__)')" more-itertools importlib-metadata
    $PY -m pip wheel -q --no-deps openai-whisper==20250625 -w .whl  # sdist only on PyPI
    $PY - <<'EOF'
import sys
sys.path.insert(0, ".")
import numpy as np
import avatar
from bench.common import load_speech
pcm = load_speech(None)  # ../shared/media/sun.wav, else espeak
np.save(".whl/speech16k.npy", pcm.astype(np.float32))
avatar.ensure_default_avatar("data/avatars")
print(f"speech {len(pcm) / 16000:.1f} s; avatar ready")
EOF
    du -sh .whl data/avatars
}

run() {
    OUT=${OUT:-bench/results}
    mkdir -p "$OUT"
    local PY=python3 tiny="" random=full device=() speech=(--speech .whl/speech16k.npy)
    if [ "${SMOKE:-0}" = 1 ]; then
        PY=${PY_SMOKE:-.venv/bin/python} tiny="--tiny --batch 1,4 --iters 2" random=tiny device=(--device cpu)
    else
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    fi
    export PYTHONUNBUFFERED=1
    $PY -c "import torch, diffusers, whisper, cv2; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cv2', cv2.__version__)" || exit 1
    local status=0 steps=("$@")
    [ ${#steps[@]} -eq 0 ] && steps=(throughput fp16 sessions distill)
    for step in "${steps[@]}"; do
        echo "== $step"
        case $step in
        throughput)
            for dtype in fp16 bf16; do
                $PY bench/musetalk_throughput.py --dtype $dtype $tiny "${device[@]}" --out "$OUT/throughput-$dtype.json" || status=1
                $PY bench/musetalk_throughput.py --dtype $dtype --channels_last $tiny "${device[@]}" \
                    --out "$OUT/throughput-$dtype-cl.json" || status=1
            done ;;
        compile)
            $PY bench/musetalk_throughput.py --dtype fp16 --channels_last --compile --batch 4,16,32 ${tiny:+--tiny --iters 2} \
                "${device[@]}" --out "$OUT/throughput-fp16-compile.json" || status=1 ;;
        fp16)
            local half=fp16; [ -n "$tiny" ] && half=bf16
            $PY bench/musetalk_fp16_check.py --random $random --half $half "${device[@]}" "${speech[@]}" \
                --out "$OUT/fp16-check.json" || status=1 ;;
        sessions|sessions-compiled)
            local counts=${SESSIONS:-1,2,4,8,12,16,24,32} seconds=${SECONDS_PER_COUNT:-20} compile=off
            [ -n "$tiny" ] && counts=1 seconds=3
            if [ $step = sessions-compiled ]; then
                [ -n "$tiny" ] && { echo "skipped with SMOKE=1 (inductor on a CPU: ~1 min per batch size)"; continue; }
                compile=reduce-overhead
            fi
            $PY bench/musetalk_sessions.py --random $random --sessions "$counts" --seconds "$seconds" "${speech[@]}" \
                --musetalk_compile $compile --out "$OUT/$step.json" || status=1 ;;
        distill)
            $PY bench/distill_speed.py $tiny "${device[@]}" --out "$OUT/distill-speed.json" || status=1 ;;
        *) echo "unknown step $step"; status=1 ;;
        esac
    done
    return $status
}

case ${1:-} in
fetch) fetch ;;
run) shift; run "$@" ;;
*) sed -n '2,20p' "$0"; exit 2 ;;
esac
