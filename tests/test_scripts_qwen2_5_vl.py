"""A Qwen2.5-VL checkpoint through the entry points: scripts/test_vqa.py and scripts/serve.py pick the 2.5 model
and processor from config.json's model_type and answer as HF's Qwen2_5_VLForConditionalGeneration does (greedy
tokens on a tiny random checkpoint written by HF; the video's second_per_grid_ts is 2, not 1)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tiny
from test_scripts import ROOT, VQA, run
from test_serving import wait_ready

ASSETS = os.path.join(ROOT, "tests", "assets")
TOKENIZER_DIR = os.path.join(ROOT, "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
CONFIG_25 = os.path.join(ASSETS, "qwen2.5-vl-3b-instruct")
IMG1, MP4 = os.path.join(ASSETS, "1.jpg"), os.path.join(ASSETS, "4.mp4")
NEW_TOKENS = 5
SMALL = {"min_pixels": 3136, "max_pixels": 12544}  # 300x168 -> 112x56 (a grid that is not whole windows)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """(HF model, folder) of a tiny random Qwen2.5-VL with the real tokenizer and the 3B processor files."""
    pytest.importorskip("mindone_qwen2vl.modeling_qwen2_5_vl")
    model = tiny.hf_model(tiny.hf_config_2_5(), seed=0)
    folder = str(tmp_path_factory.mktemp("tiny_qwen25"))
    tiny.save_checkpoint(model, folder)
    for name in os.listdir(TOKENIZER_DIR):
        if name not in ("config.json", "generation_config.json", "preprocessor_config.json"):
            shutil.copy(os.path.join(TOKENIZER_DIR, name), folder)
    shutil.copy(os.path.join(CONFIG_25, "preprocessor_config.json"), folder)
    return model, folder


def hf_answers(model, folder, conversations):
    """HF's greedy answers for the conversations as the scripts prepare them (left-padded batch)."""
    import torch

    from mindone_qwen2vl import Qwen2_5_VLProcessor

    processor = Qwen2_5_VLProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, padding=True)
    with torch.no_grad():
        out = model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, do_sample=False,
                             max_new_tokens=NEW_TOKENS)
    new = out[:, inputs["input_ids"].shape[1]:].numpy()
    return processor.batch_decode(new, skip_special_tokens=True), inputs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user(*content):
    return [{"role": "user", "content": list(content)}]


def test_vqa_script_answers_images_and_videos_as_hf(qwen25, tmp_path):
    model, folder = qwen25
    conversations = [
        user({"type": "image", "image": IMG1}, {"type": "text", "text": "Describe."}),
        # Frames 0-119 (4 s) at 1 fps: 4 frames, 2 s per temporal grid step. A whole number of seconds, where HF 4.57
        # (which truncates the seconds to an integer) and our fractional rule agree, so HF is the reference.
        user({"type": "video", "video": MP4, "fps": 1.0, "video_start": 0.0, "video_end": 3.98, **SMALL},
             {"type": "text", "text": "What happens?"}),
    ]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    output = tmp_path / "answers.jsonl"
    env = {"env": dict(os.environ, MINDONE_QWEN2VL_CACHE=str(tmp_path / "cache"))}
    code, _, err, _ = run(VQA, ["--model_name_or_path", folder, "--batch_file", str(batch), "--output", str(output),
                                "--max_new_tokens", str(NEW_TOKENS), "--mode", "pynative",
                                "--min_pixels", str(SMALL["min_pixels"]), "--max_pixels", str(SMALL["max_pixels"])],
                          env)
    assert code == 0, err
    answers = [json.loads(line)["answer"] for line in output.read_text().splitlines()]
    conversations[0] = user({"type": "image", "image": IMG1, **SMALL}, {"type": "text", "text": "Describe."})
    expected, inputs = hf_answers(model, folder, conversations)
    assert inputs["second_per_grid_ts"].tolist() == [2.0]
    assert answers == expected


def test_server_answers_an_image_request_as_hf(qwen25, tmp_path):
    openai = pytest.importorskip("openai")
    model, folder = qwen25
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model_name_or_path",
                             folder, "--port", str(port), "--mode", "pynative", "--max_batch", "2",
                             "--allowed_local_media_path", ASSETS], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, lambda: open(log.name).read()[-3000:])
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        content = [{"type": "image_url", "image_url": {"url": "file://" + IMG1}},
                   {"type": "text", "text": "What is in this picture?"}]
        reply = client.chat.completions.create(model=os.path.basename(folder), max_tokens=NEW_TOKENS, temperature=0,
                                               messages=[{"role": "user", "content": content}], extra_body=SMALL)
    finally:
        proc.kill()
        proc.wait()
    expected, inputs = hf_answers(model, folder, [user({"type": "image", "image": IMG1, **SMALL},
                                                       {"type": "text", "text": "What is in this picture?"})])
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert reply.choices[0].message.content == expected[0]


def test_video_script_passes_second_per_grid_ts(qwen25, monkeypatch, capsys):
    """video_understanding.py's run (cli.main, in this process) hands the processor's second_per_grid_ts to the
    2.5 model's generate: on a tiny random model the answer alone would not show it."""
    from mindone_qwen2vl import cli
    from mindone_qwen2vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    seen = []
    generate = Qwen2_5_VLForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("second_per_grid_ts"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", spy)
    _, folder = qwen25
    code = cli.main("video", ["--model_name_or_path", folder, "--video", MP4, "--fps", "1", "--mode", "pynative",
                              "--min_pixels", str(SMALL["min_pixels"]), "--max_pixels", str(SMALL["max_pixels"]),
                              "--max_new_tokens", "2"])
    assert code == 0, capsys.readouterr().err
    assert [np.asarray(s).tolist() for s in seen] == [[2.5]]  # 4 frames of 5 s at --fps 1: 0.8 fps


def test_unknown_model_type_is_one_line_naming_config_json(tmp_path, capsys):
    """Found from config.json before any weight or media is loaded: exit 1, the file and the supported types."""
    from mindone_qwen2vl import cli

    shutil.copytree(TOKENIZER_DIR, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), model_type="qwen3_vl")))
    code = cli.main("image", ["--model_name_or_path", str(tmp_path / "ckpt"), "--image", IMG1])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"test_vqa.py: error: {config}: model_type 'qwen3_vl' is not supported; supported model types: "
        "'qwen2_vl', 'qwen2_5_vl' (--debug shows the traceback)")
