"""The embedded default: a tiny random Qwen2-VL with the real tokenizer, built once and cached."""
import os

import numpy as np

from mindone_qwen2vl import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from mindone_qwen2vl.default_model import default_checkpoint

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def test_default_checkpoint_builds_once_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDONE_QWEN2VL_CACHE", str(tmp_path))
    folder = default_checkpoint()
    assert folder.startswith(str(tmp_path))
    stamp = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert default_checkpoint() == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == stamp  # cached, not rebuilt
    assert [f for f in os.listdir(tmp_path)] == [os.path.basename(folder)]  # no temporary left behind

    processor = Qwen2VLProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False)
    messages = [{"role": "user", "content": [{"type": "image", "image": os.path.join(ASSETS, "1.jpg")},
                                             {"type": "text", "text": "Describe this image."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np")
    logits = model(**inputs).logits.asnumpy()
    assert logits.shape == (1, inputs["input_ids"].shape[1], 151936)
    assert np.isfinite(logits).all() and logits.std() > 0.1
