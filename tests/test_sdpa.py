"""The CPU backend's fused attention kernel ("sdpa", cpu_kernels.py): the operator against a float64 reference, the
models through it against HF, its build cache and its fallback to eager attention."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn

from mindone_qwen2vl import cpu_kernels
from tiny import IMAGE, hf_logits, random_pixels, rel_err, vision_block

TOL = 1e-4


def reference(q, k, v, positions=None):
    """softmax(q k^T) v in float64, grouped-query (query group g reads key group g // (Gq / Gk)), every key
    visible or only keys 0..positions[i] for query i."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lead = q.shape[:-2]
    q = q.reshape(-1, *q.shape[-2:])
    k, v = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    s = q @ np.swapaxes(k, -1, -2)
    if positions is not None:
        s = np.where(np.arange(k.shape[1])[None, :] <= np.asarray(positions)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).reshape(*lead, -1, q.shape[-1])


class Frame(nn.Cell):
    def __init__(self, kernels):
        super().__init__()
        self.kernels = kernels

    def construct(self, q, k, v):
        return self.kernels.frame(q, k, v)


class Causal(nn.Cell):
    def __init__(self, kernels):
        super().__init__()
        self.kernels = kernels

    def construct(self, q, k, v, positions):
        return self.kernels.causal(q, k, v, positions)


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.kernels()


def _random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# Head sizes the kernel has a fixed-size path for (16, 80, 128) and one it has not (20); query rows that are not
# a whole number of its 4-row and 32-row blocks; more keys than one 128-key tile; several frames.
FRAMES = [(4, 1, 64, 64, 16), (2, 3, 37, 37, 20), (3, 2, 130, 130, 80), (2, 1, 5, 300, 128), (1, 1, 1, 1, 16)]


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_frame_kernel_equals_reference(kernels, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        cell = Frame(kernels)
        if mode == "graph":  # one graph for every shape below, as the vision tower's step compiles it
            cell.set_inputs(*[Tensor(shape=[None] * 4, dtype=ms.float32)] * 3)
        for i, (h, f, lq, length, d) in enumerate(FRAMES):
            q = _random((h, f, lq, d), 3 * i, d ** -0.5)
            k, v = _random((h, f, length, d), 3 * i + 1), _random((h, f, length, d), 3 * i + 2)
            out = cell(Tensor(q), Tensor(k), Tensor(v)).asnumpy()
            assert out.shape == q.shape
            np.testing.assert_allclose(out, reference(q, k, v), atol=2e-6, err_msg=str(FRAMES[i]))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


# (query heads, KV heads, queries, keys, head size, first query position): a whole prompt, its last queries
# only, grouped heads, a query at position 0 (one key), long enough for several key tiles.
CAUSAL = [(4, 2, 50, 50, 16, 0), (4, 2, 30, 300, 16, 270), (12, 2, 200, 200, 128, 0), (2, 1, 1, 1, 16, 0),
          (6, 3, 70, 400, 20, 330), (2, 1, 40, 400, 16, None)]  # None: positions in no order


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_causal_kernel_equals_reference(kernels, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        cell = Causal(kernels)
        if mode == "graph":
            cell.set_inputs(*[Tensor(shape=[None] * 3, dtype=ms.float32)] * 3, Tensor(shape=[None], dtype=ms.int32))
        for i, (h, kvh, sq, s, d, first) in enumerate(CAUSAL):
            q = _random((h, sq, d), 5 * i, d ** -0.5)
            k, v = _random((kvh, s, d), 5 * i + 1), _random((kvh, s, d), 5 * i + 2)
            if first is None:
                positions = np.random.default_rng(i).permutation(s)[:sq].astype(np.int32)
            else:
                positions = np.arange(first, first + sq, dtype=np.int32)
            out = cell(Tensor(q), Tensor(k), Tensor(v), Tensor(positions)).asnumpy()
            np.testing.assert_allclose(out, reference(q, k, v, positions), atol=2e-6, err_msg=str(CAUSAL[i]))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_a_bad_layout_fails_instead_of_reading_past_a_tensor(kernels):
    """Key and value tensors of different lengths: the kernel refuses (MindSpore raises) rather than read past
    the shorter one."""
    q, k = _random((2, 1, 8, 16), 0), _random((2, 1, 8, 16), 1)
    with pytest.raises(RuntimeError):
        kernels.frame(Tensor(q), Tensor(k), Tensor(_random((2, 1, 4, 16), 2))).asnumpy()


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def sdpa_ours(tiny_hf):
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, attn_implementation="sdpa")
    assert model.policy.attn_implementation == "sdpa"
    assert model.policy.describe()["attention"].startswith("sdpa")
    return model


@pytest.mark.parametrize("case", ["several_images", "video", "text_only", "mixed_left_padded_batch"])
def test_logits_match_hf(tiny_hf, sdpa_ours, ms_mode, case):
    from test_modeling import case_inputs

    inputs = case_inputs(case)
    ours = sdpa_ours(**inputs).logits.asnumpy()
    ref = hf_logits(tiny_hf[0], **inputs)
    mask = inputs.get("attention_mask")
    assert rel_err(ours, ref, mask) < TOL
    assert (ours.argmax(-1) == ref.argmax(-1))[mask.astype(bool) if mask is not None else ...].all()


@pytest.mark.parametrize("mode,new", [("graph", 6), ("pynative", 2)])
def test_greedy_generate_matches_hf(tiny_hf, sdpa_ours, mode, new):
    from test_modeling import case_inputs

    inputs = case_inputs("mixed_left_padded_batch")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        ours = sdpa_ours.generate(**inputs, max_new_tokens=new, eos_token_id=[])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    with torch.no_grad():
        ref = tiny_hf[0].generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("path", ["layer_kernels", "attend_step"])
def test_many_prompt_lengths_and_images_share_one_attend_graph(tiny_hf, sdpa_ours, path, monkeypatch):
    """Prompts of several lengths, with and without images, each equal to HF; the prompt's layer step (its two
    CPU kernels, csrc/prompt.cc) compiles once, and no eager attend step compiles at all. Where those kernels do
    not apply (float16, a tensor-parallel rank), the layer's halves run as two steps, the fused attention's
    compiling once."""
    if path == "attend_step":
        monkeypatch.setattr(sdpa_ours.model, "prompt_kernels", lambda: None)
    grids = [None, (1, 4, 6), (1, 8, 4), (1, 6, 10)]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for n, grid in zip((3, 17, 40, 9), grids):
            ids = [[1] * n + ([] if grid is None else vision_block(IMAGE, grid)) + [5]]
            inputs = dict(input_ids=np.array(ids))
            if grid is not None:
                inputs.update(pixel_values=random_pixels([grid], n), image_grid_thw=np.array([grid]))
            ours = sdpa_ours(**inputs).logits.asnumpy()
            assert rel_err(ours, hf_logits(tiny_hf[0], **inputs)) < TOL
        graphs = sdpa_ours.compiled_graphs()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    attend = {k: v for k, v in graphs.items() if k.startswith(("text.attend", "text.layer")) and v}
    assert attend.get("text.layer_fused" if path == "layer_kernels" else "text.attend_fused") == 1, attend
    assert set(attend) <= {"text.layer_fused", "text.attend_fused"}, attend
    assert graphs["vision.block_fused"] == 1 and graphs["vision.attend"] == 0  # each block one kernel


def test_qwen2_5_vl_windows_and_frames_match_hf(ms_mode, tmp_path):
    from test_qwen2_5_vl import case_inputs as case25

    from mindone_qwen2vl import Qwen2_5_VLForConditionalGeneration
    from tiny import hf_config_2_5, hf_model, save_checkpoint

    hf = hf_model(hf_config_2_5(tied=True, tokens_per_second=2), seed=11)
    folder = save_checkpoint(hf, tmp_path)
    ours = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, progress=False, attn_implementation="sdpa")
    for case in ("several_images", "mixed_left_padded_batch"):
        inputs = case25(case)
        mask = inputs.get("attention_mask")
        assert rel_err(ours(**inputs).logits.asnumpy(), hf_logits(hf, **inputs), mask) < TOL


# ------------------------------------------------------------------------------------------------ build
def test_the_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp  # found, not compiled again
    source = tmp_path / "sdpa.cc"
    source.write_text(cpu_kernels.SOURCES[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (source,) + cpu_kernels.SOURCES[1:])
    second = cpu_kernels.build()
    assert second != first  # another source: another library
    header = tmp_path / "kernels.h"
    header.write_text(cpu_kernels.HEADERS[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "HEADERS", (header,))
    third = cpu_kernels.build()
    assert third not in (first, second)  # another header: another library
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".so") == sorted(
        [first.name, second.name, third.name])


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(tmp_path))
    source = tmp_path / "broken.cc"
    source.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (source,))
    with pytest.raises(cpu_kernels.KernelsUnavailable, match="failed on broken.cc"):
        cpu_kernels.build()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.cc"]
    monkeypatch.undo()
    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(source / "kernels"))  # under a file: not writable
    with pytest.raises(cpu_kernels.KernelsUnavailable, match="cannot write the kernel cache .*broken.cc/kernels"):
        cpu_kernels.build()
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(cpu_kernels.KernelsUnavailable, match="no C.. compiler: 'no-such-compiler-here'"):
        cpu_kernels.build()


def test_without_a_compiler_the_policy_warns_and_uses_eager(tmp_path, monkeypatch):
    from mindone_qwen2vl.precision import resolve_policy

    monkeypatch.setattr(cpu_kernels, "_state", {})  # this process has not built it yet
    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(UserWarning, match="sdpa .* is not available: no C.. compiler"):
        policy = resolve_policy(attn_implementation="sdpa")
    assert policy.attn_implementation == "eager"


WRONG_KERNEL = """
#include <cstdint>
#include <cstring>
#include <vector>
class AotExtra;
static int Zero(int nparam, void **params, int *ndims, int64_t **shapes) {
  int64_t n = 1;
  for (int i = 0; i < ndims[nparam - 1]; ++i) n *= shapes[nparam - 1][i];
  std::memset(params[nparam - 1], 0, n * sizeof(float));
  return 0;
}
extern "C" int FrameAttention(int n, void **p, int *d, int64_t **s, const char **, void *, void *) {
  return Zero(n, p, d, s);
}
extern "C" int CausalAttention(int n, void **p, int *d, int64_t **s, const char **, void *, void *) {
  return Zero(n, p, d, s);
}
extern "C" std::vector<int64_t> FrameAttentionInferShape(int *d, int64_t **s, AotExtra *) {
  return std::vector<int64_t>(s[0], s[0] + d[0]);
}
extern "C" std::vector<int64_t> CausalAttentionInferShape(int *d, int64_t **s, AotExtra *) {
  return std::vector<int64_t>(s[0], s[0] + d[0]);
}
"""


def test_a_library_that_computes_wrong_is_not_used(tmp_path, monkeypatch):
    """The built library is checked against numpy before a model uses it: one that loads but computes wrong
    (here: zeros) leaves the model on eager attention, with a warning that says so."""
    from mindone_qwen2vl.precision import resolve_policy

    source = tmp_path / "wrong.cc"
    source.write_text(WRONG_KERNEL)
    monkeypatch.setattr(cpu_kernels, "SOURCES", (source,))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(tmp_path / "kernels"))
    with pytest.warns(UserWarning, match="sdpa .* is not available: the kernels built at .* compute wrong results"):
        policy = resolve_policy(attn_implementation="sdpa")
    assert policy.attn_implementation == "eager"


def test_on_ascend_sdpa_means_flash_attention():
    from mindone_qwen2vl.precision import resolve_policy

    with pytest.warns(UserWarning, match="on Ascend the fused kernel is flash_attention_2"):
        policy = resolve_policy(attn_implementation="sdpa", device="Ascend")
    assert policy.attn_implementation == "flash_attention_2"
