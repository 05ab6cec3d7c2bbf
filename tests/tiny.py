"""Shared helpers: tiny random Qwen2-VL checkpoints written by HF transformers, and inputs for them.

The HF model (torch, CPU) is the numeric reference of every parity test.
"""
import json
import os

import numpy as np

IMAGE = 151655
VIDEO = 151656
VSTART = 151652
VEND = 151653
VOCAB = 151936  # real vocabulary size, so the real token ids (pads, eos) exist
PATCH_DIM = 3 * 2 * 14 * 14


def hf_config(tied=True, layers=2, hidden=64, heads=4, kv_heads=2, vision_depth=2, vision_dim=32,
              vision_heads=4, mrope_section=(2, 3, 3), intermediate=128, vocab=VOCAB, **text):
    from transformers import Qwen2VLConfig

    text_config = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
                       tie_word_embeddings=tied, **text)
    vision_config = dict(depth=vision_depth, embed_dim=vision_dim, num_heads=vision_heads, hidden_size=hidden)
    return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tied,
                         eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)


def hf_config_2_5(tied=True, layers=2, hidden=64, heads=4, kv_heads=2, vision_depth=3, vision_dim=32,
                  vision_heads=4, vision_intermediate=48, fullatt=(1,), tokens_per_second=2, mrope_section=(2, 3, 3),
                  intermediate=128, vocab=VOCAB):
    """A tiny Qwen2.5-VL config in the nested layout transformers 4.57 writes. Windows stay 112 px (4x4
    merged tokens): the tests' grids are chosen not to be multiples of them."""
    from transformers import Qwen2_5_VLConfig

    text_config = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
                       tie_word_embeddings=tied)
    vision_config = dict(depth=vision_depth, hidden_size=vision_dim, num_heads=vision_heads,
                         intermediate_size=vision_intermediate, out_hidden_size=hidden,
                         fullatt_block_indexes=list(fullatt), tokens_per_second=tokens_per_second)
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tied,
                            eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)


def hf_model(config, seed=0):
    """A random HF model (Qwen2-VL or Qwen2.5-VL, after the config). Weights are scaled up from HF's 0.02 init
    so logits differ visibly between tokens."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    qwen2_5 = isinstance(config, Qwen2_5_VLConfig)
    model = (Qwen2_5_VLForConditionalGeneration if qwen2_5 else Qwen2VLForConditionalGeneration)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "ln_" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def save_checkpoint(model, folder, max_shard_size=None, new_names=False):
    """save_pretrained, optionally sharded, optionally rewritten with newer transformers' key names."""
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    if new_names:
        rename_to_new_scheme(folder)
    return folder


def rename_to_new_scheme(folder):
    """Rewrite a checkpoint's keys as `model.language_model.*` / `model.visual.*` (transformers >= 4.52)."""
    from safetensors.numpy import load_file, save_file

    def new(k):
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model."):
            return "model.language_model." + k[len("model."):]
        return k

    index_path = os.path.join(folder, "model.safetensors.index.json")
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    for f in files:
        path = os.path.join(folder, f)
        tensors = load_file(path)
        save_file({new(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    if os.path.exists(index_path):
        with open(index_path) as fh:
            index = json.load(fh)
        index["weight_map"] = {new(k): v for k, v in index["weight_map"].items()}
        with open(index_path, "w") as fh:
            json.dump(index, fh)


def vision_block(token, grid, merge=2):
    t, h, w = grid
    return [VSTART] + [token] * (t * h * w // merge ** 2) + [VEND]


def random_pixels(grids, seed=0):
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((int(grids.prod(-1).sum()), PATCH_DIM)).astype(np.float32)


def left_pad(rows, pad_id=151643):
    """Left-pad token lists into (input_ids, attention_mask) int64 arrays."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def hf_logits(model, **inputs):
    import torch

    with torch.no_grad():
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
        return model(**kw).logits.float().numpy()


def rel_err(ours, ref, mask=None):
    """max |diff| over max |ref| (over the unpadded positions when mask is given)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ours, ref = ours[keep], ref[keep]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
