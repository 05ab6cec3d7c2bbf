"""benchmarks/benchmark.py end to end on its smallest shape: both workloads, both runners report every figure.

Speed itself is not asserted here (timings belong to benchmark runs, docs/benchmarks.md); this keeps the script
working.
"""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "benchmarks", "benchmark.py")


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCHMARK, "--shape", "overhead", "--runners", "graph,hf", *args,
                           "--json", str(out)], capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_warm_workload_reports_both_runners(tmp_path):
    info, stdout = run(tmp_path, "--repeats", "1", "--skip_vision", "1372x2044")
    assert info["shape"] == "overhead" and info["workload"] == "warm" and info["new_tokens"] == 64
    assert info["cpu_model"] and info["cpu_model"] in stdout
    results = {r["runner"]: r for r in info["results"]}
    assert sorted(results) == ["graph", "hf"]
    for runner, r in results.items():
        for key in ("load_s", "vision_448x448_s", "prefill_s", "decode_ms_per_token", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (runner, key, r[key])
        assert "vision_1372x2044_s" not in r  # skipped as asked
        assert len(r["decode_ms_runs"]) == 1 and r["decode_ms_per_token"] == r["decode_ms_runs"][0]
    rows = [line for line in stdout.splitlines() if line.startswith("| graph |") or line.startswith("| hf |")]
    assert len(rows) == 2, stdout


def test_mixed_workload_reports_each_request(tmp_path):
    info, stdout = run(tmp_path, "--workload", "mixed", "--requests", "4", "--seed", "3", "--passes", "2")
    assert info["workload"] == "mixed" and info["new_tokens"] == 8 and len(info["requests"]) == 4
    summary = {s["runner"]: s for s in info["summary"]}
    assert sorted(summary) == ["graph", "hf"]
    for r in info["results"]:
        assert len(r["requests"]) == 4 and all(q["s"] > 0 and q["rss_mb"] > 0 for q in r["requests"])
        assert len(r["pass_2"]) == 4 and all(q["s"] > 0 and q["rss_mb"] > 0 for q in r["pass_2"])
        # Both runners saw the same prompts.
        assert [q["prompt_tokens"] for q in r["requests"]] == [q["prompt_tokens"] for q in info["results"][0]["requests"]]
    for s in summary.values():
        assert s["total_s"] >= s["median_s"] > 0 and s["p95_s"] >= s["median_s"]
    graphs = summary["graph"]["graphs_by_request"]
    assert graphs == sorted(graphs) and 0 < graphs[-1] <= 20  # compiled graphs only accumulate, and few
    assert "graphs" not in summary["hf"]
    # The stream sent again compiles nothing: its graphs exist after the first pass.
    assert summary["graph"]["again_graphs"] == 0 and "again_graphs" not in summary["hf"]
    for s in summary.values():
        assert s["again_total_s"] > 0 and math.isfinite(s["again_rss_rise_mb"])
    assert "again: total s" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| graph |") or line.startswith("| hf |")]
    assert len(rows) == 2, stdout


def test_every_shape_is_a_valid_config_of_its_model(tmp_path):
    """The shapes (Qwen2-VL's and Qwen2.5-VL's) load as our configs and HF's, as the model they name."""
    import runpy

    import transformers

    from mindone_qwen2vl.config import load_config

    bench = runpy.run_path(BENCHMARK)
    for name in bench["SHAPES"]:
        config = bench["shape_config"](name)
        (tmp_path / "config.json").write_text(json.dumps(config))
        ours = load_config(str(tmp_path))
        assert ours.model_type == bench["model_type"](name) == config["model_type"], name
        hf = getattr(transformers, bench["HF_CLASSES"][ours.model_type]).config_class(**config)
        assert hf.text_config.hidden_size == ours.text_config.hidden_size == ours.vision_config.out_features, name
