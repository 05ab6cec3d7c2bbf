"""Precision policy, fp16 on CPU, and the flash-attention code path against an emulation of its kernel."""
import warnings

import mindspore as ms
import numpy as np
import pytest
import torch

import flash_emulation
from mindone_qwen2vl import Qwen2VLForConditionalGeneration
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
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == ms.float16
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


FLASH = PrecisionPolicy(attn_implementation="flash_attention_2", flash_dtype=ms.float32,
                        flash_kernel=flash_emulation.emulated_flash_attention_score)


@pytest.fixture
def emulated_flash():
    flash_emulation.CALLS.clear()
    yield flash_emulation.CALLS
    flash_emulation.CALLS.clear()


@pytest.mark.parametrize("case", ["several_images", "video", "mixed_left_padded_batch"])
def test_flash_path_equals_eager(flash_ckpt, emulated_flash, ms_mode, case):
    eager = load(flash_ckpt)
    flash = load(flash_ckpt, policy=FLASH)
    inputs = case_inputs(case)
    a = eager(**inputs).logits.asnumpy()
    b = flash(**inputs).logits.asnumpy()
    if ms_mode == "pynative":  # graph mode runs the emulation compiled, without the Python-side call log
        assert {call[0] for call in emulated_flash} == {"BNSD"}
        heads = {call[2][1] for call in emulated_flash}
        assert heads == {2, 4}, heads  # both the vision (2 heads) and the decoder (4 heads) path used the kernel
    err = rel_err(b, a, inputs.get("attention_mask"))
    print(f"flash (emulated) vs eager, {case} [{ms_mode}]: {err:.2e}")
    assert err < 1e-5


def test_flash_vision_calls_batch_the_frames_of_equal_length(flash_ckpt, emulated_flash):
    from tiny import random_pixels

    flash = load(flash_ckpt, policy=FLASH)
    grid = np.array([(1, 4, 6), (2, 4, 4)])  # frames of 24, 16 and 16 patches
    flash.get_vision_features(random_pixels(grid), grid)
    # Per vision block (2), one call per frame length: [frames, heads, length, head_dim], keys alike, no mask.
    per_block = [("BNSD", 0, (2, 2, 16, 16), (2, 2, 16, 16), None), ("BNSD", 0, (1, 2, 24, 16), (1, 2, 24, 16), None)]
    assert emulated_flash == per_block * 2


def test_flash_vision_splits_batches_above_the_kernel_limit(flash_ckpt, emulated_flash, monkeypatch):
    """The kernel documents at most 2048 batch entries: frames (or windows) of one length beyond that go in
    several calls. Shown with the limit lowered to 2: a 5-frame video runs as 2 + 2 + 1 frames and gives the
    eager tower's features."""
    from mindone_qwen2vl import attention
    from tiny import random_pixels

    grid = np.array([(5, 4, 4)])
    pixels = random_pixels(grid)
    eager = load(flash_ckpt).get_vision_features(pixels, grid).asnumpy()
    monkeypatch.setattr(attention, "FLASH_MAX_BATCH", 2)
    flash = load(flash_ckpt, policy=FLASH).get_vision_features(pixels, grid).asnumpy()
    assert [call[2][0] for call in emulated_flash] == [2, 2, 1] * 2  # per block (2): frames per call
    assert np.abs(flash - eager).max() <= 1e-5 * np.abs(eager).max()


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
    assert flash.policy.attn_implementation == "sdpa"  # the CPU's fused kernel
    inputs = case_inputs("image")
    np.testing.assert_allclose(flash(**inputs).logits.asnumpy(), bf16(**inputs).logits.asnumpy(), rtol=0, atol=1e-5)


def test_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_policy("fp8")
    with pytest.raises(ValueError, match="attn_implementation 'flash'"):
        resolve_policy(attn_implementation="flash")


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
        (ms.float32, ms.float32, "sdpa")
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


# ------------------------------------------------------------------------------------------------ import
_IMPORT_SCRIPT = """
import os, threading
# The dependencies first: what they do on import is not the package's (transformers' AutoTokenizer imports
# torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR).
import mindspore, numpy, tqdm.auto  # noqa: F401
from transformers import AutoTokenizer  # noqa: F401
from transformers.models.qwen2_vl import image_processing_qwen2_vl  # noqa: F401
before_threads, before_env = threading.active_count(), dict(os.environ)
import mindone_qwen2vl
from mindone_qwen2vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor  # noqa: F401
import mindone_qwen2vl.generation, mindone_qwen2vl.kernels, mindone_qwen2vl.loading  # noqa: F401
print("THREADS", before_threads, threading.active_count())
print("ISA", [k for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if k in os.environ])
print("ENV_CHANGED", sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k)))
"""


def test_importing_the_package_has_no_effects_on_the_process():
    """No environment writes (the oneDNN ISA cap is gone) and no threads (the CPU launcher is gone): importing
    the package and its model modules changes nothing in the process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("THREADS", "ISA", "ENV_CHANGED"))
    before, after = lines["THREADS"].split()
    assert before == after, out.stdout
    assert lines["ISA"] == "[]", out.stdout
    assert lines["ENV_CHANGED"] == "[]", out.stdout


def test_flash_refuses_a_head_size_its_kernel_does_not_document(tiny_hf):
    """The default tiny checkpoint has vision heads of 8 (32/4): the flash kernel documents multiples of 16
    only, so the flash path says so and names the way out instead of handing the NPU a bad shape."""
    _, folder = tiny_hf
    model = load(folder, policy=FLASH)
    with pytest.raises(ValueError, match="multiple of 16.*this model's is 8.*eager"):
        model(**case_inputs("image"))
