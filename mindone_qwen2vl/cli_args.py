"""The flags of scripts/test_vqa.py and scripts/video_understanding.py, the rules every number obeys (flags,
preset values and batch-file items alike), and the error a bad argument raises."""
import argparse
import math
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MODE = "graph"  # every decode step reuses one compiled graph: ~30x faster per token than pynative on CPU

# Qwen2-VL's context (max_position_embeddings, every size). One token covers 28x28 pixels of an image, or of a
# pair of video frames, so a pixel limit above this many pixels asks for more than any prompt can hold (and,
# before generation could refuse it, for gigabytes of patches).
CONTEXT_TOKENS = 32768
PIXEL_CEILING = CONTEXT_TOKENS * 28 * 28
FRAME_CEILING = CONTEXT_TOKENS // 2  # a pair of frames takes at least 4 tokens


class UsageError(Exception):
    """A bad argument: exit code 2."""


@dataclass(frozen=True)
class Number:
    """A number setting: integer or not, and its range (``low`` excluded when ``low_open``)."""

    integer: bool
    low: float
    high: float = math.inf
    low_open: bool = False
    why: str = ""  # the reason for the ceiling, told with it

    def describe(self) -> str:
        if self.integer:
            if self.high != math.inf:
                return f"an integer from {self.low} to {self.high}{self.why}"
            return "a positive integer" if self.low == 1 else f"an integer >= {self.low}"
        if self.high != math.inf:
            return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"a number {'>' if self.low_open else '>='} {self.low:g}"

    def accepts(self, value) -> bool:
        """Whether ``value`` (a parsed flag, or a JSON/YAML value) is of the right type and in range."""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value) or value > self.high:
            return False
        return value > self.low if self.low_open else value >= self.low


_PIXELS = Number(True, 1, PIXEL_CEILING, why=f" (more does not fit the model's {CONTEXT_TOKENS}-token context)")
_FRAMES = Number(True, 1, FRAME_CEILING, why=f" (more does not fit the model's {CONTEXT_TOKENS}-token context)")

# The one table of numbers: a flag --KEY, a batch item's KEY and a preset's KEY obey NUMBERS[KEY].
NUMBERS = {
    "min_pixels": _PIXELS,
    "max_pixels": _PIXELS,
    "total_pixels": _PIXELS,
    "resized_height": Number(True, 1, 28 * CONTEXT_TOKENS),
    "resized_width": Number(True, 1, 28 * CONTEXT_TOKENS),
    "fps": Number(False, 0, low_open=True),
    "sample_fps": Number(False, 0, low_open=True),
    "raw_fps": Number(False, 0, low_open=True),
    "nframes": Number(True, 2, FRAME_CEILING, why=_FRAMES.why),
    "min_frames": _FRAMES,
    "max_frames": _FRAMES,
    "video_start": Number(False, 0),
    "video_end": Number(False, 0),
    "max_new_tokens": Number(True, 1, CONTEXT_TOKENS, why=" (the model's context)"),
    "temperature": Number(False, 0, low_open=True),
    "top_p": Number(False, 0, 1, low_open=True),
    "top_k": Number(True, 0),
    "repetition_penalty": Number(False, 0, low_open=True),
    "seed": Number(True, 0, 2 ** 32 - 1),
    "tensor_parallel": Number(True, 1),
    "launch_nice": Number(True, 0, 19),
}


def number_problem(key, value):
    """None if ``value`` suits setting ``key``, else "expected ..., got ..." (for a message naming where)."""
    rule = NUMBERS[key]
    return None if rule.accepts(value) else f"expected {rule.describe()}, got {value!r}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors print the usage block; ours are one line
        raise UsageError(message)


def _number(key):
    rule = NUMBERS[key]

    def parse(text):
        try:
            value = int(text) if rule.integer else float(text)
        except ValueError:
            value = None
        if value is None or not rule.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {rule.describe()}, got {text!r}")
        return value
    return parse


def _text(text):
    """Text for the tokenizer: bytes that are not UTF-8 reach Python as lone surrogates, refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"not valid UTF-8 (byte 0x{bad.hex()} at character {e.start + 1})") from None
    return text


def build_parser(kind):
    """kind: "image" (test_vqa.py) or "video" (video_understanding.py)."""
    prog = "test_vqa.py" if kind == "image" else "video_understanding.py"
    what = "images" if kind == "image" else "videos"
    p = _Parser(prog=prog, description=f"Ask Qwen2-VL or Qwen2.5-VL about {what} (MindSpore, Ascend or CPU).",
                epilog="Without --model_name_or_path a tiny model with random weights runs the whole pipeline "
                       "(meaningless answers). Exit codes: 0 done, 1 failure, 2 bad arguments, 130 interrupted. "
                       "http(s) downloads are bounded by environment variables: QWENVL_URL_TIMEOUT (seconds without "
                       "data, default 30), QWENVL_URL_DEADLINE (seconds for the whole download, default 300), "
                       "QWENVL_URL_MAX_BYTES (default 1073741824).")
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", help="hub id, Hugging Face folder or converted folder "
                                                "(default: the tiny random-weight model)")
    m.add_argument("--config", help="preset: a YAML file or a name from configs/ (e.g. qwen2-vl-7b-instruct); "
                                    "flags override it")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="compute dtype (default fp32)")
    m.add_argument("--attn_implementation", choices=["eager", "flash_attention_2", "sdpa"],
                   help="default: flash_attention_2 on Ascend, sdpa (a fused CPU kernel) elsewhere")
    m.add_argument("--mode", choices=["pynative", "graph"], help=f"MindSpore mode (default {DEFAULT_MODE})")
    m.add_argument("--tensor_parallel", type=_number("tensor_parallel"), metavar="N",
                   help="split the decoder over N cards; launch with msrun --worker_num=N")
    m.add_argument("--launch_nice", type=_number("launch_nice"), metavar="N", default=0,
                   help="CPU only, opt-in: run the model from a thread at nice N (1-19; 10 is a good value) so "
                        "that MindSpore's kernel threads get the cores (vision and prompts ~10%% faster on the "
                        "development machine); default 0: off")

    i = p.add_argument_group("input")
    if kind == "image":
        i.add_argument("--image", action="append", default=[], help="image path or URL; repeat for several")
        i.add_argument("--min_pixels", type=_number("min_pixels"), help="lower bound of each image's resized area")
        i.add_argument("--max_pixels", type=_number("max_pixels"), help="upper bound of each image's resized area")
    else:
        i.add_argument("--video", action="append", default=[], help="video path or URL; repeat for several")
        i.add_argument("--fps", type=_number("fps"), help="frames sampled per second (default 2)")
        i.add_argument("--nframes", type=_number("nframes"), help="frames sampled (instead of --fps)")
        i.add_argument("--min_pixels", type=_number("min_pixels"), help="lower bound of each frame's resized area")
        i.add_argument("--max_pixels", type=_number("max_pixels"), help="upper bound of each frame's resized area")
        i.add_argument("--total_pixels", type=_number("total_pixels"), help="budget of the whole video's area")
    i.add_argument("--prompt", type=_text,
                   help="the question (default: describe the " + ("image" if kind == "image" else "video") + ")")
    i.add_argument("--batch_file", help="JSON lines, one conversation each (a list of messages, or an object with "
                                        "'messages' and an optional 'id'); answered as one batch")
    i.add_argument("--output", help="with --batch_file: write the JSON-lines answers here (default stdout)")

    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=_number("max_new_tokens"), help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    g.add_argument("--do_sample", action="store_true", help="sample (default greedy)")
    g.add_argument("--temperature", type=_number("temperature"))
    g.add_argument("--top_p", type=_number("top_p"))
    g.add_argument("--top_k", type=_number("top_k"))
    g.add_argument("--repetition_penalty", type=_number("repetition_penalty"))
    g.add_argument("--seed", type=_number("seed"), help="makes sampling repeatable")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return p
