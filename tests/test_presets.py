"""The Qwen2.5-VL presets (configs/qwen2.5-vl-*.yaml): they load, ask for Qwen2-VL's precision policy, and their
tensor-parallel sizes split the published decoders (the Qwen2-VL presets: test_precision.py)."""
import json
import os

import mindspore as ms
import pytest

from mindone_qwen2vl.config import Qwen2VLTextConfig
from mindone_qwen2vl.parallel import check_tensor_parallel
from mindone_qwen2vl.presets import load_preset, preset_policy

CONFIG_3B = os.path.join(os.path.dirname(__file__), "assets", "qwen2.5-vl-3b-instruct", "config.json")

# The decoders of the Hub's Qwen2.5-VL-*-Instruct config.json files (heads, KV heads, MLP width, vocabulary).
DECODERS = {
    "7b": dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
               vocab_size=152064),
    "32b": dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648,
                vocab_size=152064),
    "72b": dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=29568,
                vocab_size=152064),
}
PRESETS = {"3b": 1, "7b": 1, "32b": 4, "72b": 8}  # size -> tensor parallel size (cards)


def decoder(size):
    if size == "3b":
        with open(CONFIG_3B, encoding="utf-8") as f:
            return Qwen2VLTextConfig.from_dict(json.load(f))
    return Qwen2VLTextConfig.from_dict(DECODERS[size])


@pytest.mark.parametrize("size", list(PRESETS))
def test_qwen2_5_vl_presets(size):
    data = load_preset(f"qwen2.5-vl-{size}-instruct")
    assert data["model_name_or_path"] == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    assert data["tensor_parallel_size"] == PRESETS[size]
    check_tensor_parallel(decoder(size), data["tensor_parallel_size"])  # raises if the split is impossible
    policy = preset_policy(data, device="Ascend")
    assert (policy.compute_dtype, policy.conv_dtype, policy.attn_implementation) == \
        (ms.bfloat16, ms.bfloat16, "flash_attention_2")
    assert data["mode"] == "graph"
    # The pixel limits of Qwen2-VL's presets: the image processor and qwen-vl-utils are the same.
    assert {k: v for k, v in data.items() if "pixels" in k or k == "fps"} == \
        {k: v for k, v in load_preset("qwen2-vl-7b-instruct").items() if "pixels" in k or k == "fps"}
