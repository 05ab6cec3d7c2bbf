"""scripts/test_vqa.py and scripts/video_understanding.py end to end, in subprocesses, on the tiny default model.

Each subprocess imports MindSpore and transformers (5-20 s on these machines), so the successful runs are few and
each checks several things: several images with streaming, a video with a preset in graph mode, a mixed batch
file. Bad arguments are checked once per script in a subprocess (exit code 2, one line); the other bad arguments
and the failures (exit code 1) go through `cli.main` in this process, which is all the scripts call.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import mindspore as ms
import pytest

from mindone_qwen2vl import cli
from mindone_qwen2vl.default_model import RANDOM_WEIGHTS_NOTICE, default_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA = os.path.join(ROOT, "scripts", "test_vqa.py")
VIDEO = os.path.join(ROOT, "scripts", "video_understanding.py")
ASSETS = os.path.join(ROOT, "tests", "assets")
IMG1, IMG2, MP4 = (os.path.join(ASSETS, f) for f in ("1.jpg", "2.jpg", "4.mp4"))
TIMEOUT = 600
ON_CPU = ms.get_context("device_target") == "CPU"
NEW_TOKENS = 5
SMALL = ["--min_pixels", "3136", "--max_pixels", "12544"]  # 300x168 -> 112x56: a few vision tokens
TIMINGS = re.compile(r"^timings: load [\d.]+ s \| preprocess [\d.]+ s \| prefill [\d.]+ s \((.+?)\) \| decode "
                     r"[\d.]+ (?:tokens|steps)/s", re.M)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment whose default-model cache is a fresh folder, built here once (not by the
    first script run racing the others)."""
    cache = str(tmp_path_factory.mktemp("qwen2vl_cache"))
    environment = dict(os.environ, MINDONE_QWEN2VL_CACHE=cache)
    # No oneDNN cap of the user's: the package sets none either, so the settings line names none.
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        environment.pop(name, None)
    old = os.environ.get("MINDONE_QWEN2VL_CACHE")
    os.environ["MINDONE_QWEN2VL_CACHE"] = cache
    try:
        folder = default_checkpoint()
    finally:
        if old is None:
            del os.environ["MINDONE_QWEN2VL_CACHE"]
        else:
            os.environ["MINDONE_QWEN2VL_CACHE"] = old
    return {"env": environment, "folder": folder}


def run(script, args, env, stream=False):
    """(exit code, stdout, stderr, stdout chunks as they arrived)."""
    proc = subprocess.Popen([sys.executable, script, *args], env=env["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    while True:  # os.read returns what is in the pipe now: a streamed answer arrives in several reads
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        chunks.append(data.decode("utf-8", "replace"))
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait(timeout=60)
    reader.join(timeout=60)
    stderr = err[0].decode("utf-8", "replace") if err else ""
    return proc.returncode, "".join(chunks), stderr, chunks


def expected_prompt_tokens(folder, conversations):
    """Padded prompt length the processor gives for these conversations (the scripts' items, built here)."""
    from mindone_qwen2vl import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, padding=True)
    return inputs["input_ids"].shape[1]


def user(*content):
    return [{"role": "user", "content": list(content)}]


def small_image(path):
    return {"type": "image", "image": path, "min_pixels": 3136, "max_pixels": 12544}


PROMPT = "What differs between these two images?"


@pytest.fixture(scope="module")
def image_run(env):
    return run(VQA, ["--image", IMG1, "--image", IMG2, "--prompt", PROMPT, "--max_new_tokens", str(NEW_TOKENS),
                     "--mode", "pynative", *SMALL], env)


@pytest.fixture(scope="module")
def batch_run(env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    conversations = [
        user({"type": "image", "image": IMG1}, {"type": "image", "image": IMG2}, {"type": "text", "text": PROMPT}),
        {"id": "clip", "messages": user({"type": "video", "video": MP4, "nframes": 2, "max_pixels": 12544},
                                        {"type": "text", "text": "What happens?"})},
        {"id": 7, "messages": [{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "Who are you?"}]},
        user({"type": "image", "image": IMG1}, {"type": "video", "video": MP4, "nframes": 2, "max_pixels": 12544},
             {"type": "text", "text": "Is the image a frame of the video?"}),
    ]
    batch_file = folder / "requests.jsonl"
    lines = [json.dumps(c) for c in conversations]
    batch_file.write_text(lines[0] + "\n" + lines[1] + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line
    output = folder / "answers.jsonl"
    result = run(VQA, ["--batch_file", str(batch_file), "--output", str(output), "--max_new_tokens",
                       str(NEW_TOKENS), "--mode", "pynative", *SMALL, "--model_name_or_path", env["folder"]], env)
    return result, output, conversations


def test_several_images_stream_the_answer_then_timings(env, image_run):
    code, out, err, chunks = image_run
    assert code == 0, err
    assert RANDOM_WEIGHTS_NOTICE in err  # no --model_name_or_path: said plainly
    assert "Traceback" not in err
    # Streamed: the answer reached the pipe piece by piece while it was generated, not in one write at the end.
    assert len([c for c in chunks if c.strip()]) >= 2, chunks
    assert out.endswith("\n") and out.strip()
    match = TIMINGS.search(err)
    assert match, err
    # Both images, resized within the flags' pixel limits, are in the prompt.
    want = expected_prompt_tokens(env["folder"], [user(small_image(IMG1), small_image(IMG2),
                                                       {"type": "text", "text": PROMPT})])
    assert match.group(1) == f"{want} prompt tokens"
    assert f"({NEW_TOKENS - 1} steps)" in err  # pynative: every decode step is in the rate
    if ON_CPU:
        assert "| device CPU |" in err and "oneDNN" not in err  # the package caps nothing


def test_batch_file_answers_every_line_in_order(env, image_run, batch_run):
    (code, out, err, _), output, conversations = batch_run
    assert code == 0, err
    assert out == ""  # answers went to --output; stdout stays clean
    assert RANDOM_WEIGHTS_NOTICE not in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 4, 5]  # file line numbers; the blank line 3 is skipped
    assert [r.get("id") for r in rows] == [None, "clip", 7, None]
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)
    assert f"wrote 4 answers to {output}" in err
    if ON_CPU:
        assert "| device CPU |" in err and "oneDNN" not in err  # nor for a batch
    match = TIMINGS.search(err)
    assert match, err
    items = [c if isinstance(c, list) else c["messages"] for c in conversations]
    items[0] = user(small_image(IMG1), small_image(IMG2), {"type": "text", "text": PROMPT})
    items[3] = user(small_image(IMG1), items[3][0]["content"][1], items[3][0]["content"][2])
    assert match.group(1) == f"batch 4 x {expected_prompt_tokens(env['folder'], items)} padded prompt tokens"
    # Row 1 is the image run's request, left-padded in a batch: greedy gives the same answer it streamed.
    assert image_run[0] == 0
    assert image_run[1] == rows[0]["answer"] + "\n"


def test_video_with_preset_in_graph_mode(env):
    code, out, err, _ = run(VIDEO, ["--config", "qwen2-vl-2b-instruct", "--model_name_or_path", env["folder"],
                                    "--video", MP4, "--nframes", "4", "--max_pixels", "12544",
                                    "--max_new_tokens", "4"], env)
    assert code == 0, err
    assert out.strip()
    assert RANDOM_WEIGHTS_NOTICE not in err
    # The preset asks for bf16 and flash attention: on a CPU each falls back with one warning line.
    warnings = [line for line in err.splitlines() if line.startswith("video_understanding.py: warning:")]
    assert len(warnings) == 2 and "bfloat16" in warnings[0] and "flash_attention_2" in warnings[1], err
    assert "| graph mode |" in err and "attention eager" in err  # mode from the preset
    match = TIMINGS.search(err)
    assert match, err
    # --nframes replaces the preset's fps, --max_pixels its video_max_pixels; its video_total_pixels stays.
    video = {"type": "video", "video": MP4, "nframes": 4, "max_pixels": 12544, "total_pixels": 19267584}
    want = expected_prompt_tokens(env["folder"], [user(video, {"type": "text", "text": "Describe this video."})])
    assert match.group(1) == f"{want} prompt tokens incl. graph compilation"
    assert "(3 steps; the first" in err  # max_new_tokens 4 from the flag, not the preset's 128


@pytest.mark.parametrize("script, args, message", [
    (VQA, ["--max_new_tokens", "0"], "argument --max_new_tokens: expected a positive integer, got '0'"),
    (VIDEO, ["--video", MP4, "--fps", "1", "--nframes", "4"], "give --fps or --nframes, not both"),
])
def test_bad_argument_subprocess(env, script, args, message):
    code, out, err, _ = run(script, args, env)
    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [f"{os.path.basename(script)}: error: {message} (see --help)"]


# ---------------------------------------------------------------------------------------------- in-process
def call(kind, args, capsys):
    code = cli.main(kind, args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path, text):
    path.write_text(text)
    return str(path)


BAD_ARGUMENTS = [
    ("image", ["--bogus"], "unrecognized arguments: --bogus"),
    ("image", ["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    ("image", ["--mode", "eager"], "argument --mode: invalid choice: 'eager'"),
    ("image", ["--top_k", "-1", "--do_sample"], "argument --top_k: expected an integer >= 0, got '-1'"),
    ("image", ["--top_p", "1.5", "--do_sample"], "argument --top_p: expected a number in (0, 1], got 1.5"),
    ("image", ["--temperature", "0"], "argument --temperature: expected a number > 0, got '0'"),
    ("image", ["--temperature", "0.7", "--top_k", "5"], "--temperature, --top_k are for sampling: add --do_sample"),
    ("image", ["--seed", "1"], "--seed is for sampling: add --do_sample"),
    ("image", ["--top_p", "0.9", "--seed", "1"], "--top_p, --seed are for sampling: add --do_sample"),
    ("image", ["--image", "/no/such.jpg"], "--image: image file '/no/such.jpg' does not exist"),
    ("image", ["--image", ASSETS], f"--image: image file '{ASSETS}' is a directory"),
    ("image", ["--prompt", "  "], "--prompt is empty"),
    ("image", ["--min_pixels", "5000", "--max_pixels", "4000"],
     "--min_pixels 5000 is larger than --max_pixels 4000 for images"),
    ("image", ["--config", "qwen2-vl-2b-instruct", "--max_pixels", "12544"],
     "min_pixels (from the preset) 200704 is larger than --max_pixels 12544 for images"),
    ("image", ["--config", "qwen2-vl-3b"], "--config: no preset 'qwen2-vl-3b': not a file, and not one of"),
    ("image", ["--model_name_or_path", "/no/such/folder"], "--model_name_or_path '/no/such/folder': no such folder"),
    ("image", ["--model_name_or_path", IMG1], "is a file, not a checkpoint folder"),
    ("image", ["--output", "answers.jsonl"], "--output is for --batch_file answers"),
    ("image", ["--tensor_parallel", "0"], "argument --tensor_parallel: expected a positive integer, got '0'"),
    ("video", [], "give --video (or --batch_file)"),
    ("video", ["--video", "/no/such.mp4"], "--video: video file '/no/such.mp4' does not exist"),
    ("video", ["--video", MP4, "--nframes", "1"], "argument --nframes: expected an integer >= 2, got '1'"),
    ("video", ["--image", IMG1], "unrecognized arguments: --image"),
]


@pytest.mark.parametrize("kind, args, message", BAD_ARGUMENTS)
def test_bad_arguments(kind, args, message, capsys):
    code, out, err = call(kind, args, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].endswith("(see --help)"), err


BATCH_FILES = [
    ("{oops\n", "line 1: not valid JSON"),
    ("\n\n", "holds no conversations"),
    ('{"id": 1}\n', "line 1: an object needs a 'messages' list"),
    ('[]\n', "line 1: expected a non-empty list of messages"),
    ('[{"role": "user"}]\n', "line 1: message 1 is not an object with 'role' and 'content'"),
    ('[{"role": "user", "content": 3}]\n', "line 1: message 1 has content of type int"),
    ('[{"role": "user", "content": ["hi"]}]\n', "line 1: message 1, content item 1 is not an object"),
    ('\n[{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}]\n',
     "line 2: image file '/no/such.png' does not exist"),
    ('[{"role": "user", "content": [{"type": "video"}]}]\n', "line 1: video item {'type': 'video'} names no file"),
    # "image_url" names an image file as it does for the processor: plain, or OpenAI style {"url": ...}.
    ('[{"role": "user", "content": [{"image_url": "/no/such.png"}]}]\n', "line 1: image file '/no/such.png' does not"),
    ('[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such.png"}}]}]\n',
     "line 1: image file '/no/such.png' does not exist"),
]


@pytest.mark.parametrize("text, message", BATCH_FILES)
def test_bad_batch_files(text, message, tmp_path, capsys):
    path = write(tmp_path / "requests.jsonl", text)
    code, out, err = call("video", ["--batch_file", path], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and path in lines[0], err


def test_batch_file_items_are_read_as_the_processor_reads_them(env, tmp_path):
    """The batch file's image items are the processor's (and the chat template's): an "image_url" key makes one,
    a "type": "image_url" without that key does not (the template writes no placeholder for it, so the file it
    names is neither checked nor loaded)."""
    from mindone_qwen2vl import Qwen2VLProcessor
    from mindone_qwen2vl.cli_args import build_parser
    from mindone_qwen2vl.cli_settings import resolve_settings

    content = [{"type": "image_url", "image_url": {"url": IMG1}}, {"image_url": IMG2},
               {"type": "image_url", "url": "/no/such.jpg"}, {"type": "text", "text": PROMPT}]
    path = write(tmp_path / "requests.jsonl", json.dumps(user(*content)) + "\n")
    (request,) = resolve_settings("image", build_parser("image").parse_args(["--batch_file", path, *SMALL])).requests
    items = request["messages"][0]["content"]
    assert [i for i, item in enumerate(items) if item.get("max_pixels") == 12544] == [0, 1]  # the flags' image limits
    processor = Qwen2VLProcessor.from_pretrained(env["folder"])
    assert processor.apply_chat_template(request["messages"]).count("<|image_pad|>") == 2
    inputs = processor.apply_chat_template(request["messages"], tokenize=True, return_dict=True)
    assert len(inputs["image_grid_thw"]) == 2


def test_batch_file_conflicts(tmp_path, capsys):
    path = write(tmp_path / "requests.jsonl", '[{"role": "user", "content": "hi"}]\n')
    code, _, err = call("image", ["--batch_file", path, "--image", IMG1, "--prompt", "x"], capsys)
    assert code == 2 and "--batch_file carries its own conversations: drop --image and --prompt" in err
    code, _, err = call("image", ["--batch_file", str(tmp_path / "none.jsonl")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = call("image", ["--batch_file", path, "--output", str(tmp_path / "no" / "out.jsonl")], capsys)
    assert code == 2 and "folder" in err and "does not exist" in err
    code, _, err = call("image", ["--batch_file", path, "--output", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err


def test_tensor_parallel_needs_msrun_and_a_fitting_size(env, capsys):
    code, _, err = call("image", ["--tensor_parallel", "2", "--model_name_or_path", env["folder"]], capsys)
    assert code == 2 and "not started by msrun" in err and "msrun --worker_num=2" in err
    code, _, err = call("image", ["--tensor_parallel", "3", "--model_name_or_path", env["folder"]], capsys)
    assert code == 2 and "num_attention_heads 4 is not divisible by tensor_parallel_size 3" in err


def test_undecodable_image_fails_with_one_line(env, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    code, out, err = call("image", ["--image", str(bad), "--mode", "pynative", "--model_name_or_path", env["folder"]],
                          capsys)
    assert code == 1 and out == ""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("test_vqa.py: error: cannot decode image") and str(bad) in last, err


def test_checkpoint_that_does_not_load_fails_with_one_line(env, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(env["folder"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["lm_head.weight" if "lm_head.weight" in weights else "model.norm.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = call("image", ["--model_name_or_path", str(broken), "--prompt", "hi", "--mode", "pynative"],
                          capsys)
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("test_vqa.py: error: checkpoint does not fit the model config: missing 1 tensors"), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(env, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot decode image"):
        cli.main("image", ["--image", str(bad), "--mode", "pynative", "--debug", "--model_name_or_path", env["folder"]])
    with pytest.raises(cli.UsageError, match="does not exist"):
        cli.main("image", ["--image", str(tmp_path / "none.jpg"), "--debug"])


def test_help_lists_the_options(capsys):
    assert cli.main("video", ["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--video", "--fps", "--nframes", "--total_pixels", "--batch_file", "--config", "--tensor_parallel",
                 "--dtype", "--attn_implementation", "--mode", "--do_sample", "--debug"):
        assert flag in out
    assert "Exit codes: 0 done, 1 failure, 2 bad arguments" in " ".join(out.split())
