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
