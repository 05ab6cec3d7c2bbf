"""The embedded default: a tiny Qwen2-VL with random weights and the real Qwen2-VL tokenizer.

With no checkpoint given, the scripts build it once (numpy only, no torch, no network), cache it under
~/.cache/mindone_qwen2vl (or $MINDONE_QWEN2VL_CACHE) and run the whole pipeline on it, so a fresh install
can be tried end to end. Its answers are meaningless: the weights are random.
"""
import json
import os
import shutil
import tempfile

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "qwen2-vl-2b-instruct")
NAME = "tiny-random-qwen2-vl"
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: no --model_name_or_path given: using a tiny Qwen2-VL with RANDOM weights and the real tokenizer. "
    "The pipeline runs for real, the answer is meaningless. Pass a Qwen2-VL checkpoint for real answers."
)
_MARKER = "COMPLETE"


def cache_dir():
    return os.environ.get("MINDONE_QWEN2VL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindone_qwen2vl"))


def tiny_config():
    """The real 2B config.json, shrunk: every width and depth small, vocabulary and token ids real."""
    with open(os.path.join(ASSETS, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_window_layers=2, torch_dtype="float32")
    config["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # head_dim 16 -> 8 frequencies
    config["vision_config"].update(depth=2, embed_dim=32, num_heads=2, hidden_size=64)
    return config


def _random_weights(config, seed):
    from .config import Qwen2VLConfig
    from .loading import expected_tensors, parameter_pieces
    from .modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from .precision import PrecisionPolicy

    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(config), PrecisionPolicy())
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_tensors(parameter_pieces(model)).items():  # the checkpoint's names and shapes
        if len(shape) >= 2:
            weights[name] = rng.normal(0.0, 0.08, shape).astype(np.float32)
        elif "norm" in name or "ln_q" in name:
            weights[name] = (1.0 + rng.normal(0.0, 0.05, shape)).astype(np.float32)
        else:
            weights[name] = rng.normal(0.0, 0.05, shape).astype(np.float32)
    return weights


def build_default_checkpoint(folder, seed=0):
    """Write the tiny random checkpoint, its config and the bundled tokenizer/processor files into `folder`."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config = tiny_config()
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(ASSETS):
        if name != "config.json":
            shutil.copy(os.path.join(ASSETS, name), folder)
    save_file(_random_weights(config, seed), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def default_checkpoint():
    """The cached tiny random checkpoint, built on first use (atomically: a crash leaves no half folder)."""
    root = cache_dir()
    folder = os.path.join(root, NAME)
    if os.path.exists(os.path.join(folder, _MARKER)):
        return folder
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=NAME + ".", dir=root)
    try:
        build_default_checkpoint(tmp)
        open(os.path.join(tmp, _MARKER), "w").close()
        if os.path.exists(folder) and not os.path.exists(os.path.join(folder, _MARKER)):
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished build from an older version
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, _MARKER)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same build first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
