"""The server under concurrent clients, beside HF transformers answering the same requests one at a time.

    python benchmarks/serve_benchmark.py --shape overhead [--clients 1,4,8] [--requests 16] [--max_tokens 128]

One random checkpoint per shape (benchmark.py's), a seeded request set (images of 200-800 px a side, a video,
text), `scripts/serve.py` in a subprocess on a loopback port, streamed requests from N client threads at a time.
Per concurrency: wall time, requests/s, aggregate generated tokens/s, time to first token p50/p95. Then HF's
`generate` on the same processor inputs, one request after another, in this process. A warm-up request (not
timed) compiles the server's graphs first. Needs the test extra (openai client side: httpx).

Answers are 128 tokens at most by default, the scripts' default answer length (cli_args.DEFAULT_MAX_NEW_TOKENS):
the random weights never stop early, so every request generates all of them. With short answers (--max_tokens
32) the prefills, which run one after another, are most of the time at any concurrency (docs/benchmarks.md).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchmark  # noqa: E402  (this folder's module: checkpoints and shapes)

VIDEO = os.path.join(ROOT, "tests", "assets", "4.mp4")
QUESTIONS = ["Describe this image.", "What colours do you see?", "Write two sentences about it.", "Is it day or night?"]


def request_set(count, seed, folder):
    """[(OpenAI content parts, our processor's conversation)]: 3 in 4 images, then a video, then text."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 8 == 7:
            out.append(([{"type": "text", "text": question * 3}], [{"type": "text", "text": question * 3}]))
        elif i % 8 == 6:
            parts = [{"type": "video_url", "video_url": {"url": VIDEO}}, {"type": "text", "text": question}]
            ours = [{"type": "video", "video": VIDEO, "fps": 1.0, "max_pixels": 128 * 28 * 28},
                    {"type": "text", "text": question}]
            out.append((parts, ours))
        else:
            h, w = (int(v) for v in rng.integers(200, 801, 2))
            path = os.path.join(folder, f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            parts = [{"type": "image_url", "image_url": {"url": path}}, {"type": "text", "text": question}]
            out.append((parts, [{"type": "image", "image": path}, {"type": "text", "text": question}]))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, media, max_batch, launch_nice=0):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model_name_or_path", ckpt,
                             "--port", str(port), "--max_batch", str(max_batch), "--max_queue", "256",
                             "--allowed_local_media_path", "/", "--served_model_name", "bench",
                             "--launch_nice", str(launch_nice)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(open(log.name).read()[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)


def stream_one(base, parts, max_tokens, fps):
    import httpx

    body = {"model": "bench", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "fps": fps, "max_pixels": 128 * 28 * 28}
    t = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - t, tokens


def run_clients(base, requests, clients, max_tokens):
    results, lock = [], threading.Lock()
    todo = list(enumerate(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                _, (parts, _) = todo.pop(0)
            outcome = stream_one(base, parts, max_tokens, 1.0)
            with lock:
                results.append(outcome)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return dict(clients=clients, wall_s=wall, requests_per_s=len(results) / wall, tokens=tokens,
                tokens_per_s=tokens / wall, ttft_p50_s=statistics.median(ttft),
                ttft_p95_s=ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))])


def hf_sequential(ckpt, requests, max_tokens):
    import numpy as np
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mindone_qwen2vl import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(ckpt)
    torch.set_num_threads(os.cpu_count())
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens, t = 0, time.perf_counter()
    for _, conversation in requests:
        for item in conversation:
            if item["type"] == "image":
                item["max_pixels"] = 128 * 28 * 28
        inputs = processor.apply_chat_template([[{"role": "user", "content": conversation}]],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)
        with torch.no_grad():
            out = model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                                 max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    wall = time.perf_counter() - t
    return dict(clients="HF sequential", wall_s=wall, requests_per_s=len(requests) / wall, tokens=tokens,
                tokens_per_s=tokens / wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(benchmark.SHAPES), default="overhead")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--launch_nice", type=int, default=0, choices=range(20), metavar="N",
                   help="serve.py --launch_nice N (the engine's thread at nice N); default 0: off")
    p.add_argument("--json")
    args = p.parse_args(argv)
    ckpt = benchmark.checkpoint(args.shape)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as media:
        requests = request_set(args.requests, args.seed, media)
        proc, base = start_server(ckpt, media, args.max_batch, args.launch_nice)
        rows = []
        try:
            stream_one(base, requests[0][0], args.max_tokens, 1.0)  # warm-up: compiles the graphs
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(run_clients(base, requests, clients, args.max_tokens))
                print(f"[{args.shape}] {clients} clients: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.no_hf:
            rows.append(hf_sequential(ckpt, requests, args.max_tokens))
    print(f"{args.shape}, {args.requests} requests, max_tokens {args.max_tokens}, launch nice {args.launch_nice}, "
          f"{benchmark.cpu_model()} "
          f"({os.cpu_count()} cores)")
    print("| clients | wall s | requests/s | tokens/s | TTFT p50 s | TTFT p95 s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r.get('ttft_p50_s', float('nan')):.2f} | {r.get('ttft_p95_s', float('nan')):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, requests=args.requests, max_tokens=args.max_tokens, rows=rows,
                           launch_nice=args.launch_nice,
                           cpu_model=benchmark.cpu_model()), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
