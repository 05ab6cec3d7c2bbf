"""What a command line asks for: its flags over its YAML preset over the defaults, every value checked.

A problem is a UsageError found here, before MindSpore models, transformers or media are loaded.
"""
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional

from .cli_args import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, UsageError, number_problem
from .cli_output import output_target
from .cli_requests import build_requests, check_item_options, with_defaults

# A preset's numbers obey the rules of the flag (cli_args.NUMBERS) they stand for.
_PRESET_NUMBERS = {"tensor_parallel_size": "tensor_parallel", "min_pixels": "min_pixels", "max_pixels": "max_pixels",
                   "video_max_pixels": "max_pixels", "video_total_pixels": "total_pixels", "fps": "fps",
                   "max_new_tokens": "max_new_tokens"}


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
    launch_nice: int = 0  # 0: the model runs at the caller's priority (launch_priority.py)


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
    max_new = args.max_new_tokens if args.max_new_tokens is not None else \
        preset.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    options = {"max_new_tokens": max_new, "do_sample": args.do_sample}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _check_output(path):
    """Before any work: the answers will be written beside ``path`` (a temporary file, then renamed), or into
    it when it is a device or a FIFO (cli_output.write_atomically)."""
    if os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a directory")
    target, special = output_target(path)
    if special:
        if not os.access(target, os.W_OK):
            raise UsageError(f"--output {path!r} is not writable")
        return
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path!r}: folder {parent!r} does not exist")
    # Tried, not inferred from the permission bits: a read-only mount, an immutable folder, an ACL, or a file
    # system such as /sys that refuses new files whatever the bits say (os.access said yes there, as root).
    try:
        fd, probe = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        raise UsageError(f"--output {path!r}: folder {parent!r} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.remove(probe)


def _check_preset(preset, name):
    from .presets import preset_path

    for key, flag in _PRESET_NUMBERS.items():
        if key in preset:
            problem = number_problem(flag, preset[key])
            if problem:
                raise UsageError(f"--config: {preset_path(name)}: {key}: {problem}")


def _check_downloads():
    from .qwen_vl_utils.sources import download_limits

    try:
        download_limits()
    except ValueError as e:
        raise UsageError(str(e)) from None


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
        from .presets import load_preset  # imports MindSpore (for its precision policy): only when asked

        try:
            preset = load_preset(args.config)
        except (OSError, ValueError) as e:
            raise UsageError(f"--config: {e}") from None
        _check_preset(preset, args.config)

    def pick(flag, key, default=None):
        return flag if flag is not None else preset.get(key, default)

    image_options, video_options = _media_options(kind, args, preset)
    generation = _generation_options(args, preset)
    requests = build_requests(kind, args)
    for request in requests:
        request["messages"] = with_defaults(request["messages"], image_options, video_options)
        check_item_options(request)
    _check_downloads()
    if args.output:
        _check_output(args.output)
    model = pick(args.model_name_or_path, "model_name_or_path")
    return Settings(kind=kind, model=_check_model(model) if model is not None else None,
                    dtype=pick(args.dtype, "mindspore_dtype", "fp32"), conv_dtype=preset.get("conv_dtype"),
                    attn_implementation=pick(args.attn_implementation, "attn_implementation"),
                    mode=pick(args.mode, "mode", DEFAULT_MODE),
                    tensor_parallel=pick(args.tensor_parallel, "tensor_parallel_size", 1),
                    image_options=image_options, video_options=video_options, generation=generation,
                    requests=requests, batch=args.batch_file is not None, output=args.output, seed=args.seed,
                    launch_nice=args.launch_nice)
