"""The conversations a command line asks about: one built from --image/--video and --prompt, or the lines of a
--batch_file, checked before anything heavy is loaded so that a bad line is a usage error naming its line.

Which items are images and videos, and which key names their file, is the processor's own definition
(qwen_vl_utils/content_items.py): a line is read here exactly as the processor will read it.
"""
import json
import os

from .cli_args import NUMBERS, PIXEL_CEILING, UsageError, number_problem
from .qwen_vl_utils.content_items import (
    IMAGE_OPTION_KEYS,
    IMAGE_SOURCE_KEYS,
    VIDEO_OPTION_KEYS,
    VIDEO_SOURCE_KEYS,
    is_image_item,
    is_video_item,
)
from .qwen_vl_utils.sources import is_url, local_path


def _check_media(source, kind, where):
    if not isinstance(source, str) or is_url(source) or source.startswith("data:"):
        return  # URLs, data URLs and in-line frames are checked when they are read
    try:
        local_path(source, kind)
    except FileNotFoundError as e:
        raise UsageError(f"{where}: {e}") from None


# The keys each kind of content item may carry (content_items.py); any other key is a mistake worth an error,
# not a setting silently ignored (a "max_pixel" would leave the image at full size).
_IMAGE_KEYS = {"type", *IMAGE_SOURCE_KEYS, *IMAGE_OPTION_KEYS}
_VIDEO_KEYS = {"type", *VIDEO_SOURCE_KEYS, *VIDEO_OPTION_KEYS}
_TEXT_KEYS = {"type", "text"}
_LINE_KEYS = ("messages", "id")  # an object line
_MESSAGE_KEYS = ("role", "content")


def _unknown(keys, known, what):
    extra = sorted(k for k in keys if k not in known)
    if extra:
        raise UsageError(f"{what} has unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _check_item(item, where):
    """One content item: its kind, its keys, the type of each value, every number in range."""
    if is_image_item(item):
        kind, known, keys, types = "image", _IMAGE_KEYS, IMAGE_SOURCE_KEYS, ("image", "image_url")
    elif is_video_item(item):
        kind, known, keys, types = "video", _VIDEO_KEYS, VIDEO_SOURCE_KEYS, ("video",)
    elif "text" in item:
        kind, known, keys, types = "text", _TEXT_KEYS, (), ("text",)
    else:
        raise UsageError(f"{where} is neither text, an image nor a video to the chat template (an image has "
                         "\"type\": \"image\" or an 'image' or 'image_url' key, a video \"type\": \"video\" or a "
                         "'video' key, text a 'text' key)")
    _unknown(item, known, where)
    if item.get("type", kind) not in types:
        raise UsageError(f"{where} is read as {kind} (its keys say so) but has type {item['type']!r}")
    if kind == "text":
        if not isinstance(item["text"], str):
            raise UsageError(f"{where}: text should be a string, got {type(item['text']).__name__}")
        return
    for key in sorted(item):
        if key in NUMBERS:
            problem = number_problem(key, item[key])
            if problem:
                raise UsageError(f"{where}: {key}: {problem}")
    key = next((k for k in keys if k in item), None)
    if key is None:
        raise UsageError(f"{where}: {kind} item names no file (give one of {', '.join(keys)})")
    source = item[key]
    if kind == "image" and isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}, as load_image
        source = source.get("url")
    frames = kind == "video" and isinstance(source, list) and bool(source)
    for one in (source if frames else [source]):  # a video may be a list of frames (image files)
        if not isinstance(one, str):
            raise UsageError(f"{where}: {key} should name a file or URL, got {type(one).__name__}")
        _check_media(one, "image" if frames else kind, where)


def _check_conversation(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UsageError(f"{where}: message {n} is not an object with 'role' and 'content'")
        _unknown(message, _MESSAGE_KEYS, f"{where}: message {n}")
        if message["role"] not in ("system", "user", "assistant"):
            raise UsageError(f"{where}: message {n}: role {message['role']!r} is not system, user or assistant")
        content = message["content"]
        if isinstance(content, list):
            bad = [k for k, item in enumerate(content, 1) if not isinstance(item, dict)]
            if bad:
                raise UsageError(f"{where}: message {n}, content item {bad[0]} is not an object")
            for k, item in enumerate(content, 1):
                _check_item(item, f"{where}: message {n}, content item {k}")
        elif not isinstance(content, str):
            raise UsageError(f"{where}: message {n} has content of type {type(content).__name__} "
                             "(expected text or a list of items)")
    if messages[-1]["role"] == "assistant":
        raise UsageError(f"{where}: the last message is the assistant's: nothing to answer")


def _lines(path):
    """(line number, text) of a file read as UTF-8; a byte that is not UTF-8 is an error naming its line."""
    if not os.path.isfile(path):
        raise UsageError(f"--batch_file {path!r} " + ("is a directory" if os.path.isdir(path) else "does not exist"))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"--batch_file {path!r}: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors write
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1})") from None


def read_batch_file(path):
    """[{"line", "id", "messages", "where"}] of a JSON-lines file; blank lines are skipped. Every line is checked
    (UTF-8, JSON, the keys and value types of its messages and items, numbers in range) before any is used."""
    requests = []
    for n, text in _lines(path):
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
            _unknown(entry, _LINE_KEYS, where)
            ident, entry = entry.get("id"), entry["messages"]
            if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
                raise UsageError(f"{where}: id should be a string or an integer, got {ident!r}")
        _check_conversation(entry, where)
        requests.append({"line": n, "id": ident, "messages": entry, "where": where})
    if not requests:
        raise UsageError(f"--batch_file {path!r} holds no conversations")
    return requests


def check_item_options(request):
    """The options of each media item taken together, once the command line's defaults are in: a request
    that cannot be met is a usage error naming its line (or the flags) and item."""
    where = request.get("where") or "the command line"
    for n, message in enumerate(request["messages"], 1):
        content = message["content"]
        if not isinstance(content, list):
            continue
        for k, item in enumerate(content, 1):
            if not (is_image_item(item) or is_video_item(item)):
                continue
            at = f"{where}: message {n}, content item {k}"
            for low, high in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
                if low in item and high in item and item[low] > item[high]:
                    raise UsageError(f"{at}: {low} {item[low]} is larger than {high} {item[high]}")
            if "fps" in item and "nframes" in item:
                raise UsageError(f"{at}: give fps or nframes, not both")
            if ("resized_height" in item) != ("resized_width" in item):
                raise UsageError(f"{at}: give both resized_height and resized_width, or neither")
            if "resized_height" in item and item["resized_height"] * item["resized_width"] > PIXEL_CEILING:
                raise UsageError(f"{at}: resized_height x resized_width is more than {PIXEL_CEILING} pixels "
                                 "(more does not fit the model's context)")
            start, end = item.get("video_start"), item.get("video_end")
            if start is not None and end is not None and start >= end:
                raise UsageError(f"{at}: video_start {start} is not before video_end {end}")


def build_requests(kind, args):
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
    return [{"line": None, "id": None, "messages": [{"role": "user", "content": content}], "where": None}]


def with_defaults(messages, image_options, video_options):
    """A copy of the conversation whose media items take the command line's options where they set none."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                item = dict(item)
                if is_image_item(item):
                    options = image_options
                elif is_video_item(item):
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
