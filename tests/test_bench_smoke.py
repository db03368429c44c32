"""The GPU benchmark script keeps working: a tiny-config smoke run on the CPU."""

import subprocess
import sys
import json

from conftest import ROOT


def test_musetalk_throughput_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "musetalk_throughput.py"), "--tiny", "--device", "cpu",
         "--batch", "1,2", "--iters", "1", "--warmup", "0", "--out", str(out)],
        check=True, capture_output=True, timeout=240,
    )
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert all(r["both_ms"] > 0 and r["both_fps"] > 0 for r in result["rows"])


def _bench(tmp_path, script, *args, timeout=240) -> dict:
    out = tmp_path / f"{script}.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--out", str(out)],
                   check=True, capture_output=True, timeout=timeout)
    return json.loads(out.read_text())


def test_sessions_bench_counts_speech_frames_with_the_default_model(tmp_path):
    """The sessions harness (real workers played out on a 25 fps clock) sees speech
    frames and first-frame latencies; the embedded model keeps up with one session."""
    result = _bench(tmp_path, "musetalk_sessions", "--model", "default", "--sessions", "1", "--seconds", "4",
                    "--avatars_dir", str(tmp_path / "avatars"))
    (row,) = result["rows"]
    assert row["speech_frames"] > 40 and row["utterances"] >= 1
    assert 0 < row["first_speech_ms"]["p50"] < 2000
    assert row["underrun_pct"] < 20  # loose: CI machines are shared


def test_sessions_bench_runs_musetalk_on_tiny_random_weights(tmp_path):
    result = _bench(tmp_path, "musetalk_sessions", "--random", "tiny", "--sessions", "1", "--seconds", "3",
                    "--avatars_dir", str(tmp_path / "avatars"))
    (row,) = result["rows"]
    assert result["weights"] == "random tiny" and row["batch_frames"]["passes"] > 0


def test_fp16_check_bench_compares_half_with_float32(tmp_path):
    result = _bench(tmp_path, "musetalk_fp16_check", "--random", "tiny", "--device", "cpu", "--half", "bf16",
                    "--frames", "4", "--avatars_dir", str(tmp_path / "avatars"))
    assert result["unet"]["finite"] and result["image"]["finite"]
    assert 0 < result["unet"]["rel_l2"] < 0.5  # bf16 rounds; it does not break the model
