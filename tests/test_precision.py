"""Precision policy, fp16 on CPU, and the flash-attention code path against an emulation of its kernel."""
import warnings

import mindspore as ms
import numpy as np
import pytest
import torch

import flash_emulation
from mindone_qwen2vl import Qwen2VLForConditionalGeneration
from mindone_qwen2vl.attention import FLASH_KERNEL
from mindone_qwen2vl.precision import PrecisionPolicy, resolve_policy
from mindone_qwen2vl.presets import load_preset, preset_policy
from test_modeling import case_inputs
from tiny import hf_config, hf_model, rel_err, save_checkpoint


def load(folder, **kw):
    return Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("case", ["image", "video", "mixed_left_padded_batch"])
def test_fp16_close_to_hf_fp64(tiny_hf, case):
    hf, folder = tiny_hf
    ours = load(folder, mindspore_dtype=ms.float16)
    assert ours.policy.compute_dtype == ms.float16
    assert ours.model.layers[0].self_attn.qkv_proj.weight.dtype == ms.float16
    assert ours.visual.patch_embed.proj.weight.dtype == ms.float16
    for norm in (ours.model.norm, ours.model.layers[1].input_layernorm, ours.visual.blocks[0].norm2,
                 ours.visual.merger.ln_q):
        assert norm.weight.dtype == ms.float32
    inputs = case_inputs(case)
    logits = ours(**inputs).logits
    assert logits.dtype == ms.float32
    logits = logits.asnumpy()
    assert np.isfinite(logits).all()
    with torch.no_grad():
        ref = hf.double()(**{k: torch.from_numpy(np.asarray(v)).double() if np.asarray(v).dtype.kind == "f"
                             else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    hf.float()
    err = rel_err(logits, ref, inputs.get("attention_mask"))
    print(f"fp16 {case}: relative error vs HF fp64 {err:.2e}")
    assert err < 3e-2


# ------------------------------------------------------------------------------------------------ flash
@pytest.fixture(scope="module")
def flash_ckpt(tmp_path_factory):
    # The kernel needs head sizes that are multiples of 16: vision 32/2, text 64/4.
    hf = hf_model(hf_config(vision_heads=2), seed=7)
    return save_checkpoint(hf, str(tmp_path_factory.mktemp("flash")))


@pytest.fixture
def emulated_flash():
    FLASH_KERNEL["fn"] = flash_emulation.emulated_flash_attention_score
    flash_emulation.CALLS.clear()
    yield flash_emulation.CALLS
    FLASH_KERNEL["fn"] = None


@pytest.mark.parametrize("case", ["several_images", "video", "mixed_left_padded_batch"])
def test_flash_path_equals_eager(flash_ckpt, emulated_flash, ms_mode, case):
    eager = load(flash_ckpt)
    flash = load(flash_ckpt, policy=PrecisionPolicy(attn_implementation="flash_attention_2",
                                                    flash_dtype=ms.float32))
    inputs = case_inputs(case)
    a = eager(**inputs).logits.asnumpy()
    b = flash(**inputs).logits.asnumpy()
    if ms_mode == "pynative":  # graph mode runs the emulation compiled, without the Python-side call log
        layouts = {call[0] for call in emulated_flash}
        assert layouts == {"TND", "BNSD"}, layouts  # both the vision and the decoder path used the kernel
    err = rel_err(b, a, inputs.get("attention_mask"))
    print(f"flash (emulated) vs eager, {case} [{ms_mode}]: {err:.2e}")
    assert err < 1e-5


def test_flash_vision_call_has_one_sequence_per_frame(flash_ckpt, emulated_flash):
    flash = load(flash_ckpt, policy=PrecisionPolicy(attn_implementation="flash_attention_2",
                                                    flash_dtype=ms.float32))
    grid = np.array([(1, 4, 6), (2, 4, 4)])
    from tiny import random_pixels

    flash.get_vision_features(random_pixels(grid), grid)
    tnd = [c for c in emulated_flash if c[0] == "TND"]
    assert len(tnd) == 2  # one per vision block
    assert tnd[0][2] == (24 + 32, 2, 16)


def test_emulation_rejects_wrong_plumbing():
    q = ms.Tensor(np.zeros((2, 4, 8, 16), np.float16))
    kv = ms.Tensor(np.zeros((2, 3, 8, 16), np.float16))
    with pytest.raises(RuntimeError, match="must divide"):
        flash_emulation.emulated_flash_attention_score(q, kv, kv, 4, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="head_num"):
        flash_emulation.emulated_flash_attention_score(q, q, q, 2, input_layout="BNSD")
    tnd = ms.Tensor(np.zeros((10, 2, 16), np.float16))
    with pytest.raises(RuntimeError, match="end at T1"):
        flash_emulation.emulated_flash_attention_score(tnd, tnd, tnd, 2, actual_seq_qlen=(4, 8),
                                                       actual_seq_kvlen=(4, 8), input_layout="TND")


# ------------------------------------------------------------------------------------------------ policy
def test_cpu_fallbacks_warn_and_still_match(tiny_hf):
    with pytest.warns(UserWarning, match="bfloat16 matmul/softmax have no CPU kernels"):
        bf16 = load(tiny_hf[1], mindspore_dtype="bf16")
    assert bf16.policy.compute_dtype == ms.float32
    with pytest.warns(UserWarning, match="flash_attention_2 needs an Ascend NPU"):
        flash = load(tiny_hf[1], attn_implementation="flash_attention_2")
    assert flash.policy.attn_implementation == "eager"
    inputs = case_inputs("image")
    np.testing.assert_allclose(flash(**inputs).logits.asnumpy(), bf16(**inputs).logits.asnumpy(), rtol=0, atol=1e-5)


def test_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_policy("fp8")
    with pytest.raises(ValueError, match="attn_implementation 'sdpa'"):
        resolve_policy(attn_implementation="sdpa")


@pytest.mark.parametrize("preset", ["qwen2-vl-2b-instruct", "qwen2-vl-7b-instruct", "qwen2-vl-72b-instruct"])
def test_preset_policies(preset):
    data = load_preset(preset)
    on_ascend = preset_policy(data, device="Ascend")
    assert (on_ascend.compute_dtype, on_ascend.conv_dtype, on_ascend.attn_implementation, on_ascend.flash_dtype) == \
        (ms.bfloat16, ms.bfloat16, "flash_attention_2", ms.float16)
    assert on_ascend.describe()["LayerNorm/RMSNorm"] == "Float32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_cpu = preset_policy(data, device="CPU")
    assert (on_cpu.compute_dtype, on_cpu.conv_dtype, on_cpu.attn_implementation) == \
        (ms.float32, ms.float32, "eager")
    assert len(caught) == 2  # bf16 and flash attention both fell back, each with its warning
    assert data["tensor_parallel_size"] == (8 if "72b" in preset else 1)


def test_preset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preset 'qwen9'"):
        load_preset("qwen9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mindspore_dtype: bf16\nmax_pixel: 100\n")
    with pytest.raises(ValueError, match="unknown setting 'max_pixel'"):
        load_preset(str(bad))
    bad.write_text("max_pixels: many\n")
    with pytest.raises(ValueError, match="max_pixels should be int"):
        load_preset(str(bad))


@pytest.mark.ascend
def test_real_flash_kernel_matches_eager_on_ascend(flash_ckpt):
    eager = load(flash_ckpt, mindspore_dtype="fp16", attn_implementation="eager")
    flash = load(flash_ckpt, mindspore_dtype="fp16", attn_implementation="flash_attention_2")
    inputs = case_inputs("mixed_left_padded_batch")
    err = rel_err(flash(**inputs).logits.asnumpy(), eager(**inputs).logits.asnumpy(), inputs["attention_mask"])
    assert err < 1e-2


def test_presets_found_where_an_installed_package_keeps_them(tmp_path, monkeypatch):
    import shutil

    from mindone_qwen2vl import presets

    shutil.copy(presets.preset_path("qwen2-vl-7b-instruct"), tmp_path)
    monkeypatch.setattr(presets, "CONFIG_DIRS", [str(tmp_path / "missing"), str(tmp_path)])
    assert load_preset("qwen2-vl-7b-instruct")["tensor_parallel_size"] == 1
    with pytest.raises(FileNotFoundError, match=r"not one of \['qwen2-vl-7b-instruct'\]"):
        load_preset("qwen2-vl-2b-instruct")


# ------------------------------------------------------------------------------------------------ CPU backend
_ISA_SCRIPT = """
import os, sys, numpy as np, mindspore as ms, mindone_qwen2vl
from mindspore import ops, Tensor
print("TUNED=" + str(mindone_qwen2vl.tune_cpu_matmuls(int(sys.argv[1]))))
ops.matmul(Tensor(np.ones((1, 8), np.float32)), Tensor(np.ones((8, 8), np.float32))).asnumpy()
"""


def _cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(ms.get_context("device_target") != "CPU", reason="oneDNN's ISA cap is for the CPU backend")
@pytest.mark.parametrize("given,batch,expected", [
    (None, 1, "AVX2"),
    (None, 3, "ALL"),
    (("ONEDNN_MAX_CPU_ISA", "AVX512_CORE"), 1, "AVX512_CORE"),
    (("DNNL_MAX_CPU_ISA", "AVX2"), 3, "AVX2"),
])
def test_cpu_backend_onednn_isa_follows_the_batch_unless_told(given, batch, expected):
    """The import caps oneDNN at AVX2 (its gemm runs batch-1 decode products faster than the AVX-512 brgemm);
    tune_cpu_matmuls(batch > 1), called before the first kernel, lifts the cap (the brgemm reads the weights
    once for all rows). A value the user set, under either of oneDNN's names, is left alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env["ONEDNN_VERBOSE"] = "1"
    if given:
        env[given[0]] = given[1]
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(batch)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"TUNED={expected}" in out.stdout
    isa = [line for line in out.stdout.splitlines() if ",info,cpu,isa:" in line]
    assert isa, out.stdout[-2000:]  # oneDNN ran a kernel and said which instruction set it allows
    says_avx512 = "AVX-512" in isa[0] or "AVX512" in isa[0]
    if expected == "AVX2":
        assert not says_avx512, isa[0]
    elif _cpu_has_avx512():
        assert says_avx512, isa[0]
