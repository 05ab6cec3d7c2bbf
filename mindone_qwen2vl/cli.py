"""The command lines of scripts/test_vqa.py (images) and scripts/video_understanding.py (videos).

One flow for both: flags over a YAML preset -> checked requests -> processor and inputs -> model -> generate.
A single request streams its answer to stdout; a --batch_file is answered as one left-padded batch into JSON
lines. Notices, warnings and timings go to stderr, so stdout holds only answers.

Bad arguments (flags, combinations, missing files, presets) are found before MindSpore models, transformers or
media are loaded, and exit with 2; anything failing after that exits with 1. Both print one line on stderr;
--debug shows the traceback instead.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MODE = "graph"  # every decode step reuses one compiled graph: ~30x faster per token than pynative on CPU


class UsageError(Exception):
    """A bad argument: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors print the usage block; ours are one line
        raise UsageError(message)


def _number(kind, minimum, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, "a positive integer")
_nonnegative_int = _number(int, 0, "an integer >= 0")
_positive_float = _number(float, 1e-300, "a number > 0")


def build_parser(kind):
    """kind: "image" (test_vqa.py) or "video" (video_understanding.py)."""
    prog = "test_vqa.py" if kind == "image" else "video_understanding.py"
    what = "images" if kind == "image" else "videos"
    p = _Parser(prog=prog, description=f"Ask Qwen2-VL about {what} (MindSpore, Ascend or CPU).",
                epilog="Without --model_name_or_path a tiny model with random weights runs the whole pipeline "
                       "(meaningless answers). Exit codes: 0 done, 1 failure, 2 bad arguments.")
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", help="hub id, Hugging Face folder or converted folder "
                                                "(default: the tiny random-weight model)")
    m.add_argument("--config", help="preset: a YAML file or a name from configs/ (e.g. qwen2-vl-7b-instruct); "
                                    "flags override it")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="compute dtype (default fp32)")
    m.add_argument("--attn_implementation", choices=["eager", "flash_attention_2"],
                   help="default: flash_attention_2 on Ascend, eager elsewhere")
    m.add_argument("--mode", choices=["pynative", "graph"], help=f"MindSpore mode (default {DEFAULT_MODE})")
    m.add_argument("--tensor_parallel", type=_positive_int, metavar="N",
                   help="split the decoder over N cards; launch with msrun --worker_num=N")

    i = p.add_argument_group("input")
    if kind == "image":
        i.add_argument("--image", action="append", default=[], help="image path or URL; repeat for several")
        i.add_argument("--min_pixels", type=_positive_int, help="lower bound of each image's resized area")
        i.add_argument("--max_pixels", type=_positive_int, help="upper bound of each image's resized area")
    else:
        i.add_argument("--video", action="append", default=[], help="video path or URL; repeat for several")
        i.add_argument("--fps", type=_positive_float, help="frames sampled per second (default 2)")
        i.add_argument("--nframes", type=_number(int, 2, "an integer >= 2"), help="frames sampled (instead of --fps)")
        i.add_argument("--min_pixels", type=_positive_int, help="lower bound of each frame's resized area")
        i.add_argument("--max_pixels", type=_positive_int, help="upper bound of each frame's resized area")
        i.add_argument("--total_pixels", type=_positive_int, help="budget of the whole video's area")
    i.add_argument("--prompt", help="the question (default: describe the " + ("image" if kind == "image" else "video")
                                    + ")")
    i.add_argument("--batch_file", help="JSON lines, one conversation each (a list of messages, or an object with "
                                        "'messages' and an optional 'id'); answered as one batch")
    i.add_argument("--output", help="with --batch_file: write the JSON-lines answers here (default stdout)")

    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=_positive_int, help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    g.add_argument("--do_sample", action="store_true", help="sample (default greedy)")
    g.add_argument("--temperature", type=_positive_float)
    g.add_argument("--top_p", type=_positive_float)
    g.add_argument("--top_k", type=_nonnegative_int)
    g.add_argument("--repetition_penalty", type=_positive_float)
    g.add_argument("--seed", type=_nonnegative_int, help="makes sampling repeatable")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return p


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    kind: str
    model: Optional[str]
    dtype: str
    conv_dtype: Optional[str]
    attn_implementation: Optional[str]
    mode: str
    tensor_parallel: int
    image_options: dict  # keys added to image items that lack them (pixel limits)
    video_options: dict  # keys added to video items that lack them (fps/nframes, pixel limits)
    generation: dict
    requests: List[dict]  # {"line", "id", "messages"}
    batch: bool = False
    output: Optional[str] = None
    seed: Optional[int] = None


def _is_remote(source):
    return source.startswith(("http://", "https://", "data:"))


def _check_media(source, kind, where):
    if not isinstance(source, str) or _is_remote(source):
        return  # URLs, data URLs and in-line frames are checked when they are read
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"{where}: {kind} file {path!r} {problem}")


def _is_image_item(item):
    return item.get("type") in ("image", "image_url") or "image" in item or "image_url" in item


def _is_video_item(item):
    return item.get("type") == "video" or "video" in item


def _media_items(messages):
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if _is_image_item(item) or _is_video_item(item):
                    yield item


def _check_conversation(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UsageError(f"{where}: message {n} is not an object with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, list):
            bad = [k for k, item in enumerate(content, 1) if not isinstance(item, dict)]
            if bad:
                raise UsageError(f"{where}: message {n}, content item {bad[0]} is not an object")
        elif not isinstance(content, str):
            raise UsageError(f"{where}: message {n} has content of type {type(content).__name__} "
                             "(expected text or a list of items)")
    for item in _media_items(messages):
        video = _is_video_item(item) and not _is_image_item(item)
        keys = ("video", "url", "path") if video else ("image", "image_url", "url", "path")
        source = next((item[k] for k in keys if k in item), None)
        if source is None:
            raise UsageError(f"{where}: {'video' if video else 'image'} item {item!r} names no file "
                             f"(give one of {', '.join(keys)})")
        if not video and isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
            source = source.get("url")
        _check_media(source, "video" if video else "image", where)


def read_batch_file(path):
    """[{"line", "id", "messages"}] of a JSON-lines file; blank lines are skipped."""
    if not os.path.isfile(path):
        raise UsageError(f"--batch_file {path!r} " + ("is a directory" if os.path.isdir(path) else "does not exist"))
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path} line {n}"
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            ident = None
            if isinstance(entry, dict):
                if "messages" not in entry:
                    raise UsageError(f"{where}: an object needs a 'messages' list (and may have an 'id')")
                ident, entry = entry.get("id"), entry["messages"]
            _check_conversation(entry, where)
            requests.append({"line": n, "id": ident, "messages": entry})
    if not requests:
        raise UsageError(f"--batch_file {path!r} holds no conversations")
    return requests


def _with_defaults(messages, image_options, video_options):
    """A copy of the conversation whose media items take the command line's options where they set none."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                item = dict(item)
                if _is_image_item(item):
                    options = image_options
                elif _is_video_item(item):
                    options = dict(video_options)
                    if "fps" in item or "nframes" in item:  # the item's own frame choice wins whole
                        options.pop("fps", None)
                        options.pop("nframes", None)
                else:
                    options = {}
                for key, value in options.items():
                    item.setdefault(key, value)
                items.append(item)
            message = {**message, "content": items}
        out.append(message)
    return out


def _check_limits(options, flags, what):
    lo, hi = options.get("min_pixels"), options.get("max_pixels")
    if lo is not None and hi is not None and lo > hi:
        def origin(key):
            return f"--{key}" if flags.get(key) is not None else f"{key} (from the preset)"
        raise UsageError(f"{origin('min_pixels')} {lo} is larger than {origin('max_pixels')} {hi} for {what}: "
                         "give both --min_pixels and --max_pixels")


def _media_options(kind, args, preset):
    """(image item defaults, video item defaults): the preset's pixel limits and fps, then this script's flags."""
    image = {k: v for k, v in (("min_pixels", preset.get("min_pixels")),
                               ("max_pixels", preset.get("max_pixels"))) if v is not None}
    video = {k: v for k, v in (("max_pixels", preset.get("video_max_pixels")),
                               ("total_pixels", preset.get("video_total_pixels")),
                               ("fps", preset.get("fps"))) if v is not None}
    if kind == "image":
        image.update({k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None})
    else:
        if args.fps is not None and args.nframes is not None:
            raise UsageError("give --fps or --nframes, not both")
        if args.nframes is not None:
            video.pop("fps", None)
        video.update({k: getattr(args, k) for k in ("fps", "nframes", "min_pixels", "max_pixels", "total_pixels")
                      if getattr(args, k) is not None})
    flags = {k: getattr(args, k) for k in ("min_pixels", "max_pixels")}
    _check_limits(image, flags if kind == "image" else {}, "images")
    _check_limits(video, flags if kind == "video" else {}, "videos")
    return image, video


def _generation_options(args, preset):
    if not args.do_sample:
        given = [f"--{k}" for k in ("temperature", "top_p", "top_k", "seed") if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for sampling: add --do_sample")
    if args.top_p is not None and args.top_p > 1:
        raise UsageError(f"argument --top_p: expected a number in (0, 1], got {args.top_p}")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else \
        preset.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    options = {"max_new_tokens": max_new, "do_sample": args.do_sample}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _requests(kind, args):
    """[{"line", "id", "messages"}]: the batch file's conversations, or one built from the flags."""
    media = args.image if kind == "image" else args.video
    flag = f"--{kind}"
    if args.batch_file is not None:
        given = [name for name, value in ((flag, media), ("--prompt", args.prompt)) if value]
        if given:
            raise UsageError(f"--batch_file carries its own conversations: drop {' and '.join(given)}")
        return read_batch_file(args.batch_file)
    if args.output:
        raise UsageError("--output is for --batch_file answers; a single answer streams to stdout")
    if kind == "video" and not media:
        raise UsageError("give --video (or --batch_file)")
    for source in media:
        _check_media(source, kind, flag)
    prompt = args.prompt
    if prompt is None:
        prompt = f"Describe this {kind}." if len(media) < 2 else f"Describe these {kind}s."
    if not prompt.strip():
        raise UsageError("--prompt is empty")
    content = [{"type": kind, kind: source} for source in media] + [{"type": "text", "text": prompt}]
    return [{"line": None, "id": None, "messages": [{"role": "user", "content": content}]}]


def _check_output(path):
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a directory")
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path!r}: folder {parent!r} does not exist")


def _check_model(model):
    """A local folder (expanded) or a hub id; a path that is no folder is a bad argument."""
    looks_local = os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1
    if not looks_local:
        return model  # a hub id: downloading it (or failing to) is part of loading
    folder = os.path.expanduser(model)
    if not os.path.isdir(folder):
        problem = "is a file, not a checkpoint folder" if os.path.exists(folder) else \
            "no such folder (and not a hub id like Qwen/Qwen2-VL-2B-Instruct)"
        raise UsageError(f"--model_name_or_path {model!r}: {problem}")
    return folder


def resolve_settings(kind, args) -> Settings:
    """Flags over the preset over the defaults; every argument checked (UsageError on the first problem)."""
    preset = {}
    if args.config:
        from .presets import load_preset

        try:
            preset = load_preset(args.config)
        except (OSError, ValueError) as e:
            raise UsageError(f"--config: {e}") from None

    def pick(flag, key, default=None):
        return flag if flag is not None else preset.get(key, default)

    image_options, video_options = _media_options(kind, args, preset)
    generation = _generation_options(args, preset)
    requests = _requests(kind, args)
    for request in requests:
        request["messages"] = _with_defaults(request["messages"], image_options, video_options)
    if args.output:
        _check_output(args.output)
    model = pick(args.model_name_or_path, "model_name_or_path")
    return Settings(kind=kind, model=_check_model(model) if model is not None else None,
                    dtype=pick(args.dtype, "mindspore_dtype", "fp32"), conv_dtype=preset.get("conv_dtype"),
                    attn_implementation=pick(args.attn_implementation, "attn_implementation"),
                    mode=pick(args.mode, "mode", DEFAULT_MODE),
                    tensor_parallel=pick(args.tensor_parallel, "tensor_parallel_size", 1),
                    image_options=image_options, video_options=video_options, generation=generation,
                    requests=requests, batch=args.batch_file is not None, output=args.output, seed=args.seed)


# ---------------------------------------------------------------------------------------------- running
class Clock:
    """A streamer (HF's put/end interface) that notes when each step's tokens arrive and passes them on."""

    def __init__(self, printer=None):
        self.printer = printer
        self.times = []  # times[0]: the prompt; times[k]: the k-th new token(s)

    def put(self, ids):
        self.times.append(time.perf_counter())
        if self.printer is not None:
            self.printer.put(ids)

    def end(self):
        if self.printer is not None:
            self.printer.end()


class TokenPrinter:
    """Prints each generated token's text as soon as it is whole (a streamer for one row).

    HF's TextStreamer holds text back until a space, so a word-less answer would appear only at the end.
    Qwen2-VL's byte-level tokens decode to the concatenation of their bytes: once the text decoded so far ends
    on a whole character it is final, so it is printed and the next tokens are decoded on their own, which keeps
    the work per token constant. A character split across tokens (its bytes decode to U+FFFD) waits for the rest.
    """

    def __init__(self, tokenizer, file=None):
        self.tokenizer = tokenizer
        self.file = file
        self.pending = []
        self.prompt_seen = False

    def put(self, ids):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.pending.extend(int(i) for i in _as_numpy(ids).reshape(-1))
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._print(text)
            self.pending = []

    def end(self):
        self._print(self.tokenizer.decode(self.pending, skip_special_tokens=True) + "\n")
        self.pending = []
        self.prompt_seen = False

    def _print(self, text):
        print(text, end="", flush=True, file=self.file or sys.stdout)


def format_timings(load, preprocess, start, clock, prompt_tokens, batch, mode):
    """One line: load, preprocess, prefill (vision tower + prompt, to the first token), decode tokens/s."""
    parts = [f"load {load:.2f} s", f"preprocess {preprocess:.2f} s"]
    steps = clock.times[1:]
    compiled = " incl. graph compilation" if mode == "graph" else ""
    if steps:
        tokens = f"{prompt_tokens} prompt tokens" if batch == 1 else f"batch {batch} x {prompt_tokens} padded prompt tokens"
        parts.append(f"prefill {steps[0] - start:.2f} s ({tokens}{compiled})")
    # In graph mode the first decode step compiles the step's graph: reported apart from the steady rate.
    first = 1 if mode == "graph" and len(steps) > 2 else 0
    timed = steps[first:]
    if len(timed) > 1:
        rate = (len(timed) - 1) / max(timed[-1] - timed[0], 1e-9)
        text = f"decode {rate:.2f} tokens/s ({len(steps) - 1} steps"
        if batch > 1:
            text = f"decode {rate:.2f} steps/s = {rate * batch:.2f} tokens/s (batch {batch}, {len(steps) - 1} steps"
        if first:
            text += f"; the first, {steps[1] - steps[0]:.2f} s, compiled the graph and is left out of the rate"
        parts.append(text + ")")
    return "timings: " + " | ".join(parts)


def _settings_line(settings, policy, folder, cpu_isa=None):
    d = policy.describe()
    device = d["device"] + (f" (oneDNN {cpu_isa})" if d["device"] == "CPU" and cpu_isa else "")
    return (f"model {folder} | {settings.mode} mode | device {device} | weights/matmuls {d['linear/embedding']}, "
            f"Conv3d {d['patch_embed Conv3d']}, attention {d['attention']}, norms {d['LayerNorm/RMSNorm']} | "
            f"tensor parallel {settings.tensor_parallel}")


def _write_atomically(path, lines):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(settings: Settings, say):
    """Load, preprocess, generate, print. `say(text)` writes a diagnostic line on stderr (rank 0 only)."""
    # transformers' advice that torch is absent is beside the point: only its tokenizer and processors are used.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .default_model import RANDOM_WEIGHTS_NOTICE, default_checkpoint

    t = time.perf_counter()
    if settings.model is None:
        say(RANDOM_WEIGHTS_NOTICE)
        folder = default_checkpoint()
    else:
        from .loading import resolve_folder

        folder = resolve_folder(settings.model)

    main_rank = True
    if settings.tensor_parallel > 1:
        from .config import Qwen2VLConfig
        from .parallel import check_tensor_parallel, init_tensor_parallel, is_main_rank

        try:
            check_tensor_parallel(Qwen2VLConfig.from_pretrained(folder).text_config, settings.tensor_parallel)
            init_tensor_parallel(settings.tensor_parallel)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--tensor_parallel {settings.tensor_parallel}: {e}") from None
        main_rank = is_main_rank()
        if not main_rank:
            say = _silent

    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(say)  # one line each, like every other diagnostic
        _run_pipeline(settings, folder, main_rank, say, t)


def _run_pipeline(settings, folder, main_rank, say, t):
    import mindspore as ms

    from .precision import resolve_policy
    from .processing import Qwen2VLProcessor

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")  # the user's oneDNN cap
    policy = resolve_policy(settings.dtype, settings.attn_implementation, settings.conv_dtype)
    say(_settings_line(settings, policy, folder, isa))
    processor = Qwen2VLProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
    load = time.perf_counter() - t

    # Inputs before the model: a bad image fails in seconds, not after loading 100 GB of weights.
    t = time.perf_counter()
    inputs = processor.apply_chat_template([r["messages"] for r in settings.requests], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, padding=True)
    preprocess = time.perf_counter() - t

    t = time.perf_counter()
    ms.set_context(mode=ms.GRAPH_MODE if settings.mode == "graph" else ms.PYNATIVE_MODE)
    from .modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        folder, policy=policy, progress=main_rank,
        tensor_parallel_size=settings.tensor_parallel if settings.tensor_parallel > 1 else None)
    load += time.perf_counter() - t

    if settings.seed is not None:
        ms.set_seed(settings.seed)
    clock = Clock(TokenPrinter(processor.tokenizer) if not settings.batch and main_rank else None)
    batch, prompt_len = inputs["input_ids"].shape
    start = time.perf_counter()
    out = model.generate(**inputs, **settings.generation, streamer=clock, progress=settings.batch and main_rank)
    new = _as_numpy(out)[:, prompt_len:]

    if settings.batch and main_rank:
        answers = processor.batch_decode(new, skip_special_tokens=True)
        lines = []
        for request, answer in zip(settings.requests, answers):
            row = {"line": request["line"]}
            if request["id"] is not None:
                row["id"] = request["id"]
            row["answer"] = answer
            lines.append(json.dumps(row, ensure_ascii=False))
        if settings.output:
            _write_atomically(settings.output, lines)
            say(f"wrote {len(lines)} answers to {settings.output}")
        else:
            for line in lines:
                print(line, flush=True)
    say(format_timings(load, preprocess, start, clock, prompt_len, batch, settings.mode))


def _as_numpy(x):
    import numpy as np

    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _silent(_text):
    pass


def _warning_printer(say):
    def show(message, category, filename, lineno, file=None, line=None):
        say(f"warning: {message}")
    return show


def _one_line(error):
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else ""
    # MindSpore's C++ errors continue with a call stack: the first line carries the reason.
    if isinstance(error, (ValueError, OSError, RuntimeError, UsageError)) and first:
        return first
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def main(kind, argv=None):
    """Run one command line; returns the exit code (0 done, 1 failure, 2 bad arguments, 130 interrupted)."""
    parser = build_parser(kind)
    prog = parser.prog
    debug = False

    def say(text):
        print(f"{prog}: {text}" if text.startswith("warning:") else text, file=sys.stderr, flush=True)

    mode = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        debug = args.debug
        settings = resolve_settings(kind, args)
        import mindspore as ms

        mode = ms.get_context("mode")
        run(settings, say)
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # every failure is one line; --debug shows where it came from
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if mode is not None:  # when called in-process (tests), leave MindSpore's mode as it was
            import mindspore as ms

            ms.set_context(mode=mode)
