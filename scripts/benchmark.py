"""Side-by-side speed of mindone-qwen2vl (pynative and graph mode) and HF transformers (torch, eager).

    python scripts/benchmark.py --shape 2b-slice [--json out.json] [--runners hf,pynative,graph]

For a named shape, one random HF checkpoint is written once (cached under the system temp dir) and every
runner loads the same weights and gets the same inputs, each in its own subprocess (so peak RSS and the
MindSpore execution mode are per runner). Measured per runner: load time, the vision encoder on a
448x448 and a 1372x2044 image, prefill (one 448x448 image plus a question), decode ms/token (median over
`--new_tokens` tokens, at least 24, generation forced to that length; median of `--repeats` runs after an
untimed one), peak RSS. Needs torch (the `test` extra).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # Framework cost per token: many layers, tiny widths.
    "overhead": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                               num_key_value_heads=2, mrope_section=[2, 3, 3]),
                     vision=dict(depth=2, embed_dim=64, num_heads=4)),
    # The real 2B widths, 4 decoder and 4 vision layers.
    "2b-slice": dict(text=dict(num_hidden_layers=4), vision=dict(depth=4)),
    # The full 2B shape (random weights): about 8.8 GB in fp32 per copy.
    "2b": dict(text=dict(), vision=dict()),
}
IMAGE_SIZES = {"448x448": (448, 448), "1372x2044": (1372, 2044)}
# Workers start from the environment this script was started with: importing mindone_qwen2vl here (the
# processor prepares the inputs) sets ONEDNN_MAX_CPU_ISA on a CPU, which must not reach the HF worker.
LAUNCH_ENV = dict(os.environ)
QUESTION = "Describe this image in detail."


def shape_config(name):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct", "config.json")) as f:
        config = json.load(f)
    spec = SHAPES[name]
    text = dict(spec["text"])
    section = text.pop("mrope_section", None)
    config.update(text)
    if section:
        config["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    config["vision_config"].update(spec["vision"])
    if "embed_dim" in spec["vision"] or "hidden_size" in text:
        config["vision_config"]["hidden_size"] = config["hidden_size"]
    config.pop("torch_dtype", None)
    return config


def checkpoint(name):
    folder = os.path.join(tempfile.gettempdir(), f"mindone_qwen2vl_bench_{name}")
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**shape_config(name)))
    model.save_pretrained(folder, max_shard_size="2GB")
    here = os.path.dirname(os.path.abspath(__file__))
    assets = os.path.join(here, "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
    for f in os.listdir(assets):
        if f not in ("config.json", "generation_config.json"):
            with open(os.path.join(assets, f), "rb") as src, open(os.path.join(folder, f), "wb") as dst:
                dst.write(src.read())
    open(os.path.join(folder, "DONE"), "w").close()
    return folder


# ------------------------------------------------------------------------------------------------ worker
def _peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _inputs(folder, image_size):
    import numpy as np
    from PIL import Image

    from mindone_qwen2vl import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(folder, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    h, w = image_size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="np"))


def _repeats(image, args):
    # The 14k-patch image takes minutes per run at 2B widths on 2 cores: one timed run after the warm-up.
    return 1 if image == "1372x2044" else args.repeats


def _median_time(fn, repeats):
    fn()  # warm-up (and graph compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _TokenClock:
    """A streamer that timestamps every token it receives (HF's put/end interface)."""

    def __init__(self):
        self.stamps = []

    def put(self, ids):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def decode_ms(self):
        # stamps[0]: the prompt, stamps[1]: first new token (prefill), then one per decode step.
        steps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]
        return 1000 * statistics.median(steps) if steps else float("nan")


def _decode(result, generate, repeats):
    """Decode ms/token: the median over runs of each run's median step, after one untimed run.

    The untimed run compiles (graph mode) and touches the cache memory: timed from a cold start, the first
    steps of the first run are slower than the rest (ours at 2b-slice: 90-105 ms for a few steps, then 60-65).
    """
    generate(_TokenClock())
    runs = []
    for _ in range(repeats):
        clock = _TokenClock()
        generate(clock)
        runs.append(clock.decode_ms())
    result["decode_ms_per_token"] = statistics.median(runs)
    result["decode_ms_runs"] = runs


def run_worker(args):
    import numpy as np

    result = {"runner": args.worker}
    # Inputs were prepared by the parent, so an HF worker never imports MindSpore (its RSS stays its own).
    with np.load(args.inputs) as data:
        images = {k: {n.split("/", 1)[1]: data[n] for n in data.files if n.startswith(k + "/")} for k in IMAGE_SIZES}
    prompt = images["448x448"]
    if args.worker == "hf":
        import torch
        from transformers import Qwen2VLForConditionalGeneration

        torch.set_num_threads(os.cpu_count())
        t = time.perf_counter()
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.ckpt, dtype=torch.float32).eval()
        result["load_s"] = time.perf_counter() - t
        to_t = lambda d: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}  # noqa: E731
        with torch.no_grad():
            for name, inp in images.items():
                if name in args.skip_vision:
                    continue
                pv, grid = torch.from_numpy(inp["pixel_values"]), torch.from_numpy(inp["image_grid_thw"])
                result[f"vision_{name}_s"] = _median_time(lambda: model.model.visual(pv, grid_thw=grid),
                                                          _repeats(name, args))
            tp = to_t(prompt)
            result["prefill_s"] = _median_time(lambda: model(**tp, logits_to_keep=1), args.repeats)
            _decode(result, lambda clock: model.generate(**tp, max_new_tokens=args.new_tokens,
                                                         min_new_tokens=args.new_tokens, do_sample=False,
                                                         streamer=clock), args.repeats)
    else:
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE if args.worker == "graph" else ms.PYNATIVE_MODE)
        from mindone_qwen2vl import Qwen2VLForConditionalGeneration

        t = time.perf_counter()
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.ckpt, progress=False)
        result["load_s"] = time.perf_counter() - t
        for name, inp in images.items():
            if name in args.skip_vision:
                continue
            result[f"vision_{name}_s"] = _median_time(
                lambda: model.get_vision_features(inp["pixel_values"], inp["image_grid_thw"]).asnumpy(),
                _repeats(name, args))
        result["prefill_s"] = _median_time(lambda: model(**prompt, logits_to_keep=1).logits.asnumpy(), args.repeats)
        _decode(result, lambda clock: model.generate(**prompt, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens, do_sample=False,
                                                     streamer=clock), args.repeats)
    if args.worker != "hf":
        from mindone_qwen2vl.cpu_tuning import launcher_in_use

        result["cpu_launcher"] = launcher_in_use()
    result["peak_rss_mb"] = _peak_rss_mb()
    result["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    with open(args.out, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------------ parent
COLUMNS = [("load_s", "load s"), ("vision_448x448_s", "vision 448² s"), ("vision_1372x2044_s", "vision 1372x2044 s"),
           ("prefill_s", "prefill s"), ("decode_ms_per_token", "decode ms/tok"), ("peak_rss_mb", "peak RSS MB")]


def table(results):
    lines = ["| runner | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in results:
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.0f}")
        lines.append(f"| {r['runner']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="overhead")
    p.add_argument("--runners", default="hf,pynative,graph")
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_vision", default="", help="comma-separated image sizes to skip, e.g. 1372x2044")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.skip_vision = [s for s in args.skip_vision.split(",") if s]
    if args.new_tokens < 24:
        p.error("--new_tokens must be at least 24")
    if args.worker:
        return run_worker(args)

    folder = checkpoint(args.shape)
    import numpy as np

    inputs_path = os.path.join(folder, "inputs.npz")
    np.savez(inputs_path, **{f"{k}/{n}": v for k, size in IMAGE_SIZES.items()
                             for n, v in _inputs(folder, size).items()})
    results = []
    for runner in args.runners.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", runner, "--ckpt", folder, "--out", out,
               "--inputs", inputs_path,
               "--shape", args.shape, "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--skip_vision", ",".join(args.skip_vision)]
        print(f"[{args.shape}] running {runner} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=LAUNCH_ENV)
        if proc.returncode != 0:
            print(f"runner {runner} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        with open(out) as f:
            results.append(json.load(f))
        os.remove(out)
    info = {"shape": args.shape, "config": shape_config(args.shape), "new_tokens": args.new_tokens,
            "cpu_count": os.cpu_count(), "results": results}
    print(table(results))
    print("ONEDNN_MAX_CPU_ISA: " + ", ".join(f"{r['runner']} {r.get('onednn_max_cpu_isa') or 'unset'}"
                                             for r in results))
    ours = [r for r in results if "cpu_launcher" in r]
    if ours:
        print("CPU launcher thread: " + ", ".join(f"{r['runner']} {'on' if r['cpu_launcher'] else 'off'}"
                                                  for r in ours))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
