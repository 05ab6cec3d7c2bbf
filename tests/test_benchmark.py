"""scripts/benchmark.py end to end on its smallest shape: both runners report every measurement.

Speed itself is not asserted here (timings belong to benchmark runs, docs/benchmarks.md); this keeps the script
working, and checks that the HF worker runs without the oneDNN cap the package sets for itself.
"""
import json
import math
import os
import subprocess
import sys

import mindspore as ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "scripts", "benchmark.py")


def test_benchmark_reports_both_runners(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCHMARK, "--shape", "overhead", "--runners", "graph,hf", "--repeats", "1",
                           "--skip_vision", "1372x2044", "--json", str(out)], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["shape"] == "overhead" and info["new_tokens"] == 24
    results = {r["runner"]: r for r in info["results"]}
    assert sorted(results) == ["graph", "hf"]
    for runner, r in results.items():
        for key in ("load_s", "vision_448x448_s", "prefill_s", "decode_ms_per_token", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (runner, key, r[key])
        assert "vision_1372x2044_s" not in r  # skipped as asked
        assert len(r["decode_ms_runs"]) == 1 and r["decode_ms_per_token"] == r["decode_ms_runs"][0]
    assert results["hf"]["onednn_max_cpu_isa"] == ""
    assert "cpu_launcher" not in results["hf"]
    if ms.get_context("device_target") == "CPU":
        assert results["graph"]["onednn_max_cpu_isa"] == "AVX2"
        assert results["graph"]["cpu_launcher"] is (sys.platform == "linux")
        assert f"CPU launcher thread: graph {'on' if sys.platform == 'linux' else 'off'}" in proc.stdout
    # The printed table has a row per runner.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| graph |") or line.startswith("| hf |")]
    assert len(rows) == 2, proc.stdout
