"""The flags of scripts/test_vqa.py and scripts/video_understanding.py, and the error a bad one raises."""
import argparse

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
