"""from_pretrained: both naming schemes, tied and untied heads, shards, bf16, real widths, clear errors."""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mindone_qwen2vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from mindone_qwen2vl.loading import canonical_name, checkpoint_files, parameter_pieces
from mindone_qwen2vl.weight_files import SafetensorsFile
from tiny import hf_config, hf_logits, hf_model, rel_err, save_checkpoint

IDS = np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]])


def load(folder, **kw):
    return Qwen2VLForConditionalGeneration.from_pretrained(str(folder), progress=False, **kw)


def assert_same_logits(ours, hf):
    err = rel_err(ours(IDS).logits.asnumpy(), hf_logits(hf, input_ids=IDS))
    assert err < 1e-5, err


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = hf_model(hf_config(tied=False), seed=3)
    return model, save_checkpoint(model, str(tmp_path_factory.mktemp("untied")))


def test_untied_head_loads_its_own_weights(untied):
    hf, folder = untied
    ours = load(folder)
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    np.testing.assert_array_equal(ours.lm_head.weight.asnumpy(), hf.lm_head.weight.detach().numpy())
    assert_same_logits(ours, hf)


def test_tied_head_shares_the_embedding(tiny_hf, tiny_ours):
    assert tiny_ours.config.tie_word_embeddings
    assert tiny_ours.lm_head.weight is tiny_ours.model.embed_tokens.weight
    names = [p.name for p in tiny_ours.get_parameters()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert_same_logits(tiny_ours, tiny_hf[0])


def test_new_naming_scheme_and_shards(untied, tmp_path):
    hf, _ = untied
    folder = save_checkpoint(hf, str(tmp_path / "new_sharded"), max_shard_size="5MB", new_names=True)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert any(k.startswith("model.language_model.") for k in weight_map)
    assert any(k.startswith("model.visual.") for k in weight_map)
    assert_same_logits(load(folder), hf)


def test_canonical_names_are_idempotent():
    for key, want in [("model.language_model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
                      ("model.visual.blocks.1.attn.qkv.bias", "visual.blocks.1.attn.qkv.bias"),
                      ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
                      ("visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
                      ("lm_head.weight", "lm_head.weight")]:
        assert canonical_name(key) == want
        assert canonical_name(canonical_name(key)) == want


def test_bf16_checkpoint_loads_exactly(tiny_hf, tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    src = os.path.join(tiny_hf[1], "model.safetensors")
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(src).items()}
    shutil.copy(os.path.join(tiny_hf[1], "config.json"), tmp_path)
    save_torch(bf16, str(tmp_path / "model.safetensors"))
    reader = SafetensorsFile(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    want = bf16[key].float().numpy()
    assert reader.dtype(key) == "BF16"
    np.testing.assert_array_equal(reader.get(key), want)
    ours = load(tmp_path)
    np.testing.assert_array_equal(ours.model.layers[0].mlp.up_proj.weight.asnumpy(), want)


def test_ckpt_written_by_mindspore_loads_exactly(tiny_hf, tmp_path):
    """A .ckpt as ms.save_checkpoint writes it (bf16, with its CRC trailer) loads through our streaming reader
    (weight_files.MindSporeCkptFile) to the values ms.load_checkpoint gives, bit for bit."""
    source = load_file(os.path.join(tiny_hf[1], "model.safetensors"))
    items = [{"name": k, "data": ms.Tensor(v, dtype=ms.bfloat16)} for k, v in source.items()]
    ms.save_checkpoint(items, str(tmp_path / "model.ckpt"), crc_check=True)
    shutil.copy(os.path.join(tiny_hf[1], "config.json"), tmp_path)
    assert checkpoint_files(str(tmp_path)) == [str(tmp_path / "model.ckpt")]
    ours = load(tmp_path)
    theirs = ms.load_checkpoint(str(tmp_path / "model.ckpt"), crc_check=True)
    for p in ours.get_parameters():
        np.testing.assert_array_equal(p.float().asnumpy(), theirs[p.name].float().asnumpy(), err_msg=p.name)


def test_parameters_are_the_checkpoint_tensors(tiny_hf, tiny_ours):
    """Every parameter has a checkpoint tensor's name and shape and holds it bit for bit: q/k/v and gate/up
    are the checkpoint's own projections, not a packed form."""
    hf = dict(tiny_hf[0].named_parameters())
    hf = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in hf.items()}
    hf.setdefault("lm_head.weight", tiny_hf[0].lm_head.weight)
    ours = {p.name: p for p in tiny_ours.get_parameters()}
    assert set(ours) == set(hf) - {"lm_head.weight"}  # tied: the embedding's tensor serves the head
    assert "model.layers.1.self_attn.k_proj.bias" in ours
    for name, param in ours.items():
        want = hf[name].detach().numpy()
        assert tuple(param.shape) == want.shape, name
        np.testing.assert_array_equal(param.asnumpy(), want, err_msg=name)
    assert parameter_pieces(tiny_ours)["model.layers.1.mlp.gate_proj.weight"][0] is None  # whole, not a slice


def test_norms_hold_the_checkpoint_tensors(tiny_hf, tiny_ours):
    """RMSNorm and LayerNorm parameters have the checkpoint's names and shapes ([dim]), bit for bit."""
    hf = dict(tiny_hf[0].named_parameters())
    hf = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in hf.items()}
    ours = {p.name: p for p in tiny_ours.get_parameters()}
    names = [n for n in ours if "norm" in n or ".ln_q." in n]
    assert "model.norm.weight" in names and "model.layers.1.post_attention_layernorm.weight" in names
    assert "visual.blocks.0.norm1.bias" in names and "visual.merger.ln_q.weight" in names
    for name in names:
        want = hf[name].detach().numpy()
        assert ours[name].shape == want.shape, name
        np.testing.assert_array_equal(ours[name].asnumpy(), want, err_msg=name)
    assert tiny_ours.model.norm.weight.shape == (tiny_ours.config.text_config.hidden_size,)
    assert not hasattr(tiny_ours.model.norm, "checkpoint_pieces")


def test_loads_as_fp16_with_norms_in_fp32(tiny_hf):
    ours = load(tiny_hf[1], mindspore_dtype=ms.float16)
    assert ours.model.layers[0].mlp.gate_proj.weight.dtype == ms.float16
    assert ours.model.norm.weight.dtype == ms.float32
    assert ours.visual.blocks[0].norm1.weight.dtype == ms.float32


def _rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _copy(tiny_hf, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(tiny_hf[1], folder)
    return folder


def test_missing_unexpected_and_misshaped_tensors_are_listed(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)

    def edit(t):
        del t["model.layers.1.mlp.down_proj.weight"]
        del t["model.layers.0.self_attn.k_proj.bias"]  # one piece of a packed projection
        t["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
        t["visual.merger.mlp.2.bias"] = np.zeros(7, np.float32)
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 64), np.float32)

    _rewrite(folder, edit)
    with pytest.raises(ValueError) as e:
        load(folder)
    msg = str(e.value)
    assert "missing 2 tensors: " in msg
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.layers.0.self_attn.k_proj.bias" in msg
    assert "model.layers.1.mlp.up_proj.weight: checkpoint [5, 64] vs model [128, 64]" in msg
    assert "unexpected 1 tensors: model.layers.0.self_attn.extra.weight" in msg
    assert "visual.merger.mlp.2.bias: checkpoint [7] vs model [64]" in msg


def test_truncated_file_is_named(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load(folder)


def test_index_naming_a_missing_shard(untied, tmp_path):
    folder = save_checkpoint(untied[0], str(tmp_path / "sharded"), max_shard_size="5MB")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        load(folder)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct",
                             "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load(tmp_path)


def test_missing_path_is_not_a_hub_id():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load("/nonexistent/checkpoint")


def test_real_2b_config_reads_both_layouts():
    flat = Qwen2VLConfig.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets",
                                                      "qwen2-vl-2b-instruct"))
    assert flat.text_config.hidden_size == 1536 and flat.text_config.num_hidden_layers == 28
    assert flat.text_config.mrope_section == [16, 24, 24] and flat.tie_word_embeddings
    assert flat.vision_config.embed_dim == 1280 and flat.vision_config.depth == 32
    nested = Qwen2VLConfig.from_dict(hf_config(tied=False).to_dict())
    assert nested.text_config.hidden_size == 64 and nested.text_config.mrope_section == [2, 3, 3]
    assert not nested.tie_word_embeddings


def test_text_rotary_frequencies_equal_hf(tiny_hf, tiny_ours):
    ref = tiny_hf[0].model.language_model.rotary_emb.inv_freq.numpy()
    np.testing.assert_array_equal(tiny_ours.model.rotary_emb.inv_freq.asnumpy(), ref)


@pytest.mark.slow
def test_one_layer_at_real_2b_widths(tmp_path):
    """Real 2B widths (hidden 1536, 12 heads / 2 KV heads, vision 1280, vocab 151936), one layer each."""
    with open(os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct",
                           "config.json")) as f:
        real = json.load(f)
    from transformers import Qwen2VLConfig as HFConfig

    real["num_hidden_layers"] = 1
    real["vision_config"]["depth"] = 1
    real.pop("torch_dtype", None)
    hf = hf_model(HFConfig(**real), seed=4)
    # Smaller init at these widths keeps the logits in a sane range.
    import torch

    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.mul_(0.25)
    folder = save_checkpoint(hf, str(tmp_path / "w2b"))
    del real
    ours = load(folder)
    from tiny import IMAGE, random_pixels, vision_block

    grid = np.array([(1, 4, 6)])
    inputs = dict(input_ids=np.array([[1, 2] + vision_block(IMAGE, (1, 4, 6)) + [3]]),
                  pixel_values=random_pixels(grid, 7), image_grid_thw=grid)
    err = rel_err(ours(**inputs).logits.asnumpy(), hf_logits(hf, **inputs))
    print(f"2B widths: relative error {err:.2e}")
    assert err < 1e-4


_PEAK_SCRIPT = """
import mindspore, os, sys
from mindone_qwen2vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from mindone_qwen2vl.loading import load_weights
folder = sys.argv[1]
model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(folder))
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the import's transient peak does not count
before = status("VmRSS")
load_weights(model, folder, progress=False)
print(status("VmHWM") - before)
"""


def test_peak_memory_is_about_one_copy_of_the_weights(tmp_path):
    import subprocess
    import sys

    hf = hf_model(hf_config(tied=False, hidden=256, intermediate=512, heads=4, kv_heads=2, mrope_section=(8, 12, 12)), seed=5)
    folder = save_checkpoint(hf, str(tmp_path / "big"), max_shard_size="100MB")
    weights = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, folder], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"weights {weights / 2**20:.0f} MiB, peak growth while loading {growth / 2**20:.0f} MiB")
    assert growth < 1.15 * weights
