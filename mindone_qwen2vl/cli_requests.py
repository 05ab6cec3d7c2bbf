"""The conversations a command line asks about: one built from --image/--video and --prompt, or the lines of a
--batch_file, checked before anything heavy is loaded so that a bad line is a usage error naming its line.

Which items are images and videos, and which key names their file, is the processor's own definition
(qwen_vl_utils/content_items.py): a line is read here exactly as the processor will read it.
"""
import json
import os

from .cli_args import UsageError
from .qwen_vl_utils.content_items import (
    IMAGE_SOURCE_KEYS,
    VIDEO_SOURCE_KEYS,
    is_image_item,
    is_video_item,
    vision_items,
)
from .qwen_vl_utils.sources import is_url, local_path


def _check_media(source, kind, where):
    if not isinstance(source, str) or is_url(source) or source.startswith("data:"):
        return  # URLs, data URLs and in-line frames are checked when they are read
    try:
        local_path(source, kind)
    except FileNotFoundError as e:
        raise UsageError(f"{where}: {e}") from None


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
    for item in vision_items(messages):
        kind, keys = ("image", IMAGE_SOURCE_KEYS) if is_image_item(item) else ("video", VIDEO_SOURCE_KEYS)
        key = next((k for k in keys if k in item), None)
        if key is None:
            raise UsageError(f"{where}: {kind} item {item!r} names no file (give one of {', '.join(keys)})")
        source = item[key]
        if kind == "image" and isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}, as load_image
            source = source.get("url")
        _check_media(source, kind, where)


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
    return [{"line": None, "id": None, "messages": [{"role": "user", "content": content}]}]


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
