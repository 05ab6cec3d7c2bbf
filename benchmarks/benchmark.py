"""Side-by-side speed of mindone-qwen2vl (pynative and graph mode) and HF transformers (torch, eager).

    python benchmarks/benchmark.py --shape 2b-slice [--json out.json] [--runners hf,pynative,graph]
    python benchmarks/benchmark.py --shape 3b-slice   # Qwen2.5-VL (the shapes whose name says 2.5 or 3b)
    python benchmarks/benchmark.py --workload mixed --shape overhead [--requests 32] [--runners hf,graph]

For a named shape, one random HF checkpoint is written once (cached under the system temp dir) and every
runner loads the same weights and gets the same inputs, each in its own subprocess (so peak RSS and the
MindSpore execution mode are per runner). Needs torch (the `test` extra).

`--workload warm` (default), shapes seen again and again: load time, the vision encoder on a 448x448 and a
1372x2044 image (ours: repeated first until the tower runs that size static, see graphs.HotLayouts, at most 40
times; the calls and seconds that took are reported), prefill (one 448x448 image plus a question), decode
ms/token (median over `--new_tokens` tokens, at least 24, generation forced to that length; median of
`--repeats` runs after an untimed one), peak RSS.

`--workload mixed`, what a service sees: a seeded stream of requests, each of its own shape (images of random
sizes, 200 to 1400 px a side; some requests with two images, some with a video, some text only; prompts of
varied length), greedy with `--new_tokens` (default 8) new tokens each, one after the other from a fresh
process. Per runner: startup (load), each request's time, their total, median and 95th percentile, the
requests slower than 3x the median, the graphs compiled (ours), RSS after the 10th and the last request.
`--passes 2` sends the stream again in the same process and reports that pass beside the first: its total, the
graphs it compiled, and how far RSS rose above its level after the first pass (what a workload costs once its
graphs exist and its largest inputs have run).
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
    # Qwen2.5-VL beside them: the same decoder shapes, its windowed tower (the last block of a slice attends
    # per frame, as every 8th block of the real tower does).
    "overhead-2.5": dict(model="qwen2_5_vl", text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       mrope_section=[2, 3, 3]),
                         vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                     fullatt_block_indexes=[1])),
    # The real 3B widths, 4 decoder and 4 vision layers.
    "3b-slice": dict(model="qwen2_5_vl", text=dict(num_hidden_layers=4),
                     vision=dict(depth=4, fullatt_block_indexes=[3])),
    # The full 3B shape (random weights): about 15 GB in fp32 per copy.
    "3b": dict(model="qwen2_5_vl", text=dict(), vision=dict()),
}
# The real configs the shapes start from: Qwen2-VL-2B-Instruct's and Qwen2.5-VL-3B-Instruct's.
BASE_CONFIGS = {"qwen2_vl": ("mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct", "config.json"),
                "qwen2_5_vl": ("tests", "assets", "qwen2.5-vl-3b-instruct", "config.json")}
HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
IMAGE_SIZES = {"448x448": (448, 448), "1372x2044": (1372, 2044)}
QUESTION = "Describe this image in detail."
QUESTIONS = ["Describe this image.", "What is unusual here?", "Count the objects and say what colour each one is.",
             "Write a short story about what you see, in the style of a newspaper report, with a title.",
             "Is there any text? Read it out.", "Compare the two and list every difference you can find."]


def model_type(name):
    return SHAPES[name].get("model", "qwen2_vl")


def hf_class(ckpt):
    import transformers

    with open(os.path.join(ckpt, "config.json")) as f:
        return getattr(transformers, HF_CLASSES[json.load(f)["model_type"]])


def our_class(ckpt):
    from mindone_qwen2vl.models import model_class, model_type_of

    return model_class(model_type_of(ckpt))


def shape_config(name):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", *BASE_CONFIGS[model_type(name)])) as f:
        config = json.load(f)
    spec = SHAPES[name]
    text = dict(spec["text"])
    section = text.pop("mrope_section", None)
    config.update(text)
    if section:
        config["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    config["vision_config"].update(spec["vision"])
    if model_type(name) == "qwen2_5_vl":
        config["vision_config"]["out_hidden_size"] = config["hidden_size"]  # the merger projects to the decoder
    elif "embed_dim" in spec["vision"] or "hidden_size" in text:
        config["vision_config"]["hidden_size"] = config["hidden_size"]
    config.pop("torch_dtype", None)
    return config


def checkpoint(name):
    folder = os.path.join(tempfile.gettempdir(), f"mindone_qwen2vl_bench_{name}")
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, HF_CLASSES[model_type(name)])
    model = cls(cls.config_class(**shape_config(name)))
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


def _until_static(model, name, inp, result, max_calls=40):
    """Ours: the vision tower runs a size it keeps seeing in static graphs once the time spent on it pays for
    their compilation (graphs.HotLayouts); this repeats the image until it does, and reports what that took."""
    import numpy as np

    visual, grid = model.visual, inp["image_grid_thw"]
    hot, patches = visual.hot_layouts, int(np.prod(grid, axis=1).sum())
    if hot.budget - hot.used() < patches:
        return  # too big for what is left of the budget: it stays dynamic
    t, calls = time.perf_counter(), 0
    while visual.layout(grid) not in hot.hot and calls < max_calls:
        model.get_vision_features(inp["pixel_values"], grid).asnumpy()
        calls += 1
    result[f"vision_{name}_until_static"] = dict(calls=calls, s=round(time.perf_counter() - t, 3),
                                                 static=visual.layout(grid) in hot.hot)


def _lower_launch_priority(args, result):
    """--launch_nice: ours' model runs from this (main) thread at that nice value (launch_priority.py)."""
    if args.launch_nice:
        from mindone_qwen2vl.launch_priority import lower_launch_priority

        if lower_launch_priority(args.launch_nice):
            result["runner"] = f"{args.worker} nice {args.launch_nice}"


def run_worker(args):
    import numpy as np

    result = {"runner": args.worker}
    # Inputs were prepared by the parent, so an HF worker never imports MindSpore (its RSS stays its own).
    with np.load(args.inputs) as data:
        images = {k: {n.split("/", 1)[1]: data[n] for n in data.files if n.startswith(k + "/")} for k in IMAGE_SIZES}
    prompt = images["448x448"]
    if args.worker == "hf":
        import torch

        torch.set_num_threads(os.cpu_count())
        t = time.perf_counter()
        model = hf_class(args.ckpt).from_pretrained(args.ckpt, dtype=torch.float32).eval()
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
        t = time.perf_counter()
        model = our_class(args.ckpt).from_pretrained(args.ckpt, progress=False,
                                                      attn_implementation=args.attn_implementation)
        result["load_s"] = time.perf_counter() - t
        _lower_launch_priority(args, result)
        for name, inp in images.items():
            if name in args.skip_vision:
                continue
            if args.worker == "graph":
                _until_static(model, name, inp, result)
            result[f"vision_{name}_s"] = _median_time(
                lambda: model.get_vision_features(inp["pixel_values"], inp["image_grid_thw"]).asnumpy(),
                _repeats(name, args))
        result["prefill_s"] = _median_time(lambda: model(**prompt, logits_to_keep=1).logits.asnumpy(), args.repeats)
        # Warm figures are the steady state: the whole-decoder step from the first token, not the layer-wise steps
        # a process decodes its first few hundred tokens with (layerwise.py; the mixed workload keeps those).
        model.runners.whole_after = 0
        _decode(result, lambda clock: model.generate(**prompt, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens, do_sample=False,
                                                     streamer=clock), args.repeats)
    result["peak_rss_mb"] = _peak_rss_mb()
    with open(args.out, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------------ mixed workload
def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mixed_requests(folder, count, seed):
    """The seeded stream: [(kind, description, processor outputs)] (numpy), prepared by our processor so that
    every runner gets the same inputs."""
    import numpy as np
    from PIL import Image

    from mindone_qwen2vl import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(folder)
    rng = np.random.default_rng(seed)

    def image():
        h, w = (int(v) for v in rng.integers(200, 1401, 2))
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), f"{w}x{h}"

    requests = []
    for _ in range(count):
        kind = rng.choice(["image", "image", "image", "image", "two images", "video", "text"])
        question = str(rng.choice(QUESTIONS))
        content, images, videos, what = [], [], [], []
        if kind in ("image", "two images"):
            for _ in range(2 if kind == "two images" else 1):
                img, size = image()
                images.append(img)
                what.append(size)
                content.append({"type": "image"})
        elif kind == "video":
            frames, h, w = int(rng.choice([4, 6, 8])), int(rng.integers(200, 601)), int(rng.integers(200, 601))
            videos.append(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
            what.append(f"{frames}x{w}x{h} video")
            content.append({"type": "video"})
        content.append({"type": "text", "text": question * int(rng.integers(1, 4))})
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = dict(processor(text=[text], images=images or None, videos=videos or None, return_tensors="np"))
        requests.append((str(kind), ", ".join(what) or "text", inputs))
    return requests


def run_mixed_worker(args):
    import numpy as np

    with np.load(args.inputs) as data:
        count = int(data["count"])
        requests = [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")} for i in range(count)]
    result = {"runner": args.worker, "requests": [], "passes": args.passes}
    t = time.perf_counter()
    if args.worker == "hf":
        import torch

        torch.set_num_threads(os.cpu_count())
        model = hf_class(args.ckpt).from_pretrained(args.ckpt, dtype=torch.float32).eval()

        def generate(inputs):
            with torch.no_grad():
                model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)
    else:
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE if args.worker == "graph" else ms.PYNATIVE_MODE)
        model = our_class(args.ckpt).from_pretrained(args.ckpt, progress=False,
                                                      attn_implementation=args.attn_implementation)
        _lower_launch_priority(args, result)

        def generate(inputs):
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    result["load_s"] = time.perf_counter() - t
    for again in range(args.passes):
        entries = []
        for i, inputs in enumerate(requests):
            t = time.perf_counter()
            generate(inputs)
            entry = {"s": time.perf_counter() - t, "rss_mb": _rss_mb(),
                     "prompt_tokens": int(inputs["input_ids"].shape[1])}
            if args.worker != "hf":
                entry["graphs"] = sum(model.compiled_graphs().values())
            entries.append(entry)
            print(f"  [{args.worker}] pass {again + 1}, request {i + 1}/{count}: {entry['s']:.2f} s", file=sys.stderr,
                  flush=True)
        result["requests" if again == 0 else f"pass_{again + 1}"] = entries
    result["peak_rss_mb"] = _peak_rss_mb()
    with open(args.out, "w") as f:
        json.dump(result, f)


def mixed_summary(result):
    import numpy as np

    times = np.array([r["s"] for r in result["requests"]])
    median = float(np.median(times))
    rss = [r["rss_mb"] for r in result["requests"]]
    out = {"runner": result["runner"], "load_s": result["load_s"], "total_s": float(times.sum()),
           "first_s": float(times[0]), "median_s": median, "p95_s": float(np.percentile(times, 95)),
           "slow_after_first": [i + 1 for i, v in enumerate(times) if i > 0 and v > 3 * median],
           "rss_10th_mb": rss[min(9, len(rss) - 1)], "rss_last_mb": rss[-1], "peak_rss_mb": result["peak_rss_mb"]}
    if "graphs" in result["requests"][0]:
        out["graphs"] = result["requests"][-1]["graphs"]
        out["graphs_by_request"] = [r["graphs"] for r in result["requests"]]
    last = result.get(f"pass_{result.get('passes', 1)}")
    if last:  # the stream sent again (--passes): measured against the end of the pass before it
        before = result.get(f"pass_{result['passes'] - 1}", result["requests"])
        out["again_total_s"] = float(sum(r["s"] for r in last))
        out["again_rss_rise_mb"] = max(r["rss_mb"] for r in last) - before[-1]["rss_mb"]
        if "graphs" in last[0]:
            out["again_graphs"] = last[-1]["graphs"] - before[-1]["graphs"]
    return out


MIXED_COLUMNS = [("load_s", "startup s"), ("first_s", "1st request s"), ("total_s", "total s"),
                 ("median_s", "median s"), ("p95_s", "p95 s"), ("graphs", "graphs compiled"),
                 ("rss_10th_mb", "RSS after 10th MB"), ("rss_last_mb", "RSS after last MB")]
AGAIN_COLUMNS = [("again_total_s", "again: total s"), ("again_graphs", "again: graphs"),
                 ("again_rss_rise_mb", "again: RSS rise MB")]


# ------------------------------------------------------------------------------------------------ parent
COLUMNS = [("load_s", "load s"), ("vision_448x448_s", "vision 448² s"), ("vision_1372x2044_s", "vision 1372x2044 s"),
           ("prefill_s", "prefill s"), ("decode_ms_per_token", "decode ms/tok"), ("peak_rss_mb", "peak RSS MB")]


def table(results, columns=COLUMNS):
    lines = ["| runner | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.0f}")
        lines.append(f"| {r['runner']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _run(runner, args, folder, inputs_path):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", runner, "--ckpt", folder, "--out", out,
           "--inputs", inputs_path, "--workload", args.workload, "--shape", args.shape,
           "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--passes", str(args.passes),
           "--skip_vision", ",".join(args.skip_vision), "--launch_nice", str(args.launch_nice)]
    if args.attn_implementation:
        cmd += ["--attn_implementation", args.attn_implementation]
    print(f"[{args.shape}, {args.workload}] running {runner} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=dict(os.environ))
    if proc.returncode != 0:
        print(f"runner {runner} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="overhead")
    p.add_argument("--workload", choices=["warm", "mixed"], default="warm")
    p.add_argument("--runners", default=None, help="default: hf,pynative,graph (warm), hf,graph (mixed)")
    p.add_argument("--new_tokens", type=int, default=None, help="default: 64 (warm, at least 24), 8 (mixed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=32, help="mixed: requests in the stream")
    p.add_argument("--seed", type=int, default=0, help="mixed: the stream's seed")
    p.add_argument("--passes", type=int, default=1, choices=range(1, 10), metavar="N",
                   help="mixed: send the stream N times in each process (the summary adds the last pass)")
    p.add_argument("--skip_vision", default="", help="comma-separated image sizes to skip, e.g. 1372x2044")
    p.add_argument("--launch_nice", type=int, default=0, choices=range(20), metavar="N",
                   help="ours (CPU): run the model from a thread at nice N (the scripts' opt-in); default 0: off")
    p.add_argument("--attn_implementation", choices=["eager", "sdpa"], default=None,
                   help="ours: the attention backend (default: the library's)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.skip_vision = [s for s in args.skip_vision.split(",") if s]
    mixed = args.workload == "mixed"
    args.runners = args.runners or ("hf,graph" if mixed else "hf,pynative,graph")
    args.new_tokens = args.new_tokens or (8 if mixed else 64)
    if not mixed and args.new_tokens < 24:
        p.error("--new_tokens must be at least 24")
    if args.worker:
        return run_mixed_worker(args) if mixed else run_worker(args)

    folder = checkpoint(args.shape)
    import numpy as np

    inputs_path = os.path.join(folder, f"inputs_{args.workload}.npz")
    if mixed:
        requests = mixed_requests(folder, args.requests, args.seed)
        np.savez(inputs_path, count=len(requests),
                 **{f"{i}/{n}": v for i, (_, _, inputs) in enumerate(requests) for n, v in inputs.items()})
    else:
        np.savez(inputs_path, **{f"{k}/{n}": v for k, size in IMAGE_SIZES.items()
                                 for n, v in _inputs(folder, size).items()})
    results = [r for r in (_run(runner, args, folder, inputs_path) for runner in args.runners.split(",")) if r]
    info = {"shape": args.shape, "workload": args.workload, "config": shape_config(args.shape),
            "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "results": results}
    print(f"{args.shape}, {args.workload} workload, {cpu_model()} ({os.cpu_count()} cores)")
    if mixed:
        info["requests"] = [{"kind": kind, "media": what} for kind, what, _ in requests]
        info["summary"] = [mixed_summary(r) for r in results]
        print(table(info["summary"], MIXED_COLUMNS + (AGAIN_COLUMNS if args.passes > 1 else [])))
        for s in info["summary"]:
            print(f"{s['runner']}: requests slower than 3x the median after the first: {s['slow_after_first'] or 'none'}"
                  + (f"; graphs compiled after each request: {s['graphs_by_request']}" if "graphs" in s else ""))
    else:
        print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
