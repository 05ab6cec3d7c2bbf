"""Qwen2.5-VL against HF transformers 4.57.1's Qwen2_5_VLForConditionalGeneration (fp32): config layouts, the
windowed vision tower, M-RoPE in seconds, logits and greedy tokens in pynative and graph mode, the flash path
(emulated kernel), loading both key layouts and conversion.

Grids are chosen so that windows (4x4 merged tokens, i.e. 8x8 patches) are cut at the right and bottom edges,
and one is an exact multiple (HF then pads a window row of nothing, whose boundaries it drops)."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch

from tiny import (IMAGE, VIDEO, hf_config_2_5, hf_logits, hf_model, left_pad, random_pixels, rel_err,
                  save_checkpoint, vision_block)

TOL = 1e-4
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
IMG_A, IMG_B, IMG_C = (1, 10, 14), (1, 6, 20), (1, 8, 8)  # 5x7 and 3x10 merged tokens; 8x8 fills one window
VID = (2, 10, 18)  # two temporal patches of 5x9 merged tokens
SECONDS = [2.0]  # per temporal grid step; whole, so HF 4.57.1's integer cast changes nothing
TPS = 2  # tokens_per_second of the tiny config (3B's value)


@pytest.fixture(scope="module")
def hf25(tmp_path_factory):
    """(HF model, checkpoint folder): tied embeddings as the 3B, old key names."""
    model = hf_model(hf_config_2_5(tied=True, tokens_per_second=TPS), seed=11)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


def load(folder, **kw):
    from mindone_qwen2vl import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), progress=False, **kw)


@pytest.fixture(scope="module")
def ours25(hf25):
    return load(hf25[1])


def case_inputs(name):
    if name == "several_images":
        ids = [[1] + vision_block(IMAGE, IMG_A) + [2] + vision_block(IMAGE, IMG_B) + [3] + vision_block(IMAGE, IMG_C)]
        grid = np.array([IMG_A, IMG_B, IMG_C])
        return dict(input_ids=np.array(ids), pixel_values=random_pixels(grid, 3), image_grid_thw=grid)
    if name == "video":
        return dict(input_ids=np.array([[1, 2] + vision_block(VIDEO, VID) + [3, 4]]),
                    pixel_values_videos=random_pixels([VID], 4), video_grid_thw=np.array([VID]),
                    second_per_grid_ts=np.array(SECONDS))
    if name == "mixed_left_padded_batch":
        ids, mask = left_pad([
            [1, 2] + vision_block(IMAGE, IMG_A) + [3],
            [7] + vision_block(VIDEO, VID) + [8, 9],
            [4, 5, 6],  # text only
            vision_block(IMAGE, IMG_B) + [9],
        ])
        grid = np.array([IMG_A, IMG_B])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(grid, 5), image_grid_thw=grid,
                    pixel_values_videos=random_pixels([VID], 6), video_grid_thw=np.array([VID]),
                    second_per_grid_ts=np.array(SECONDS))
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ config
def test_config_loads_the_hub_flat_layout_and_the_nested_one(tmp_path):
    from transformers import Qwen2_5_VLConfig as HFConfig

    from mindone_qwen2vl.config import Qwen2_5_VLConfig, Qwen2VLConfig, load_config

    flat = load_config(os.path.join(ASSETS, "qwen2.5-vl-3b-instruct", "config.json"))
    assert isinstance(flat, Qwen2_5_VLConfig)
    v, t = flat.vision_config, flat.text_config
    assert (v.hidden_size, v.out_hidden_size, v.intermediate_size, v.depth, v.num_heads) == (1280, 2048, 3420, 32, 16)
    assert (v.window_size, v.window_tokens, v.tokens_per_second) == (112, 4, 2)
    assert v.fullatt_block_indexes == [7, 15, 23, 31]
    assert v.in_channels == 3 and v.hidden_act == "silu"
    assert (t.hidden_size, t.num_hidden_layers, t.mrope_section) == (2048, 36, [16, 24, 24])
    assert flat.tie_word_embeddings and t.tie_word_embeddings  # the 3B ties; 7B and larger do not
    # The nested layout transformers 4.57 writes loads to the same config.
    HFConfig.from_pretrained(os.path.join(ASSETS, "qwen2.5-vl-3b-instruct", "config.json")).save_pretrained(tmp_path)
    assert "text_config" in json.loads((tmp_path / "config.json").read_text())
    nested = load_config(str(tmp_path))
    assert nested.vision_config == v and nested.tie_word_embeddings
    assert {k: getattr(nested.text_config, k) for k in vars(t) if k != "rope_scaling"} == \
        {k: getattr(t, k) for k in vars(t) if k != "rope_scaling"}
    # An untied (7B-like) config, and a model_type that does not fit the class asked for.
    untied = json.loads(open(os.path.join(ASSETS, "qwen2.5-vl-3b-instruct", "config.json")).read())
    untied["tie_word_embeddings"] = False
    (tmp_path / "untied.json").write_text(json.dumps(untied))
    assert not load_config(str(tmp_path / "untied.json")).tie_word_embeddings
    with pytest.raises(ValueError, match="model_type is 'qwen2_5_vl', expected 'qwen2_vl'"):
        Qwen2VLConfig.from_json_file(str(tmp_path / "untied.json"))
    untied["model_type"] = "qwen3_vl"
    (tmp_path / "other.json").write_text(json.dumps(untied))
    with pytest.raises(ValueError, match="model_type 'qwen3_vl' is not supported"):
        load_config(str(tmp_path / "other.json"))
    untied["model_type"] = "qwen2_5_vl"
    untied["vision_config"]["out_hidden_size"] = 1280
    (tmp_path / "bad.json").write_text(json.dumps(untied))
    with pytest.raises(ValueError, match="out_hidden_size 1280 must equal the decoder hidden_size 2048"):
        load_config(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------------------------------------ tower
def test_window_layout_equals_hf(hf25):
    """Our window order and window lengths are HF's get_window_index (boundaries deduplicated as HF does),
    and frames stay contiguous in that order."""
    from mindone_qwen2vl.modeling_vision import vision_plan

    grid = np.array([IMG_A, IMG_C, VID, IMG_B])
    index, cu = hf25[0].model.visual.get_window_index(torch.tensor(grid))
    cu = torch.unique_consecutive(torch.tensor(cu)).numpy()
    plan = vision_plan(grid, 2, 4, window=4)
    np.testing.assert_array_equal(plan.order.reshape(-1, 4)[:, 0] // 4, index.numpy())
    np.testing.assert_array_equal(plan.restore, np.argsort(index.numpy()))
    lengths = np.diff(cu)
    starts = cu[:-1]
    windows = sorted((int(s), int(n)) for s, n in zip(starts, lengths))
    ours = sorted((int(rows[f, 0]), rows.shape[1]) for rows in plan.windows.groups for f in range(len(rows)))
    assert ours == windows
    assert sorted({n for _, n in windows}) == [4, 12, 16, 24, 48, 64]  # whole windows and cut ones
    frame_lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    assert sorted(g.shape[1] for g in plan.frames.groups) == sorted(set(frame_lens.tolist()))


@pytest.mark.parametrize("grid", [[IMG_A], [IMG_A, IMG_B, IMG_C], [VID, IMG_A]], ids=["one", "three", "video_image"])
def test_vision_tower_matches_hf(hf25, ours25, ms_mode, grid):
    grid = np.array(grid)
    pixels = random_pixels(grid, 1)
    ours = ours25.get_vision_features(pixels, grid).asnumpy()
    with torch.no_grad():
        ref = hf25[0].model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert ours.shape == ref.shape == (grid.prod(-1).sum() // 4, 64)
    err = rel_err(ours, ref)
    print(f"tower {grid.tolist()} [{ms_mode}]: {err:.2e}")
    assert err < 1e-5


def test_query_blocks_within_windows_and_frames_are_exact(hf25, monkeypatch):
    """Eager attention split into query blocks (big images) in both layouts, windows and frames, each with its
    own order back: the unblocked result and HF's."""
    from mindone_qwen2vl import attention

    ours25 = load(hf25[1], attn_implementation="eager")

    grid = np.array([IMG_A, IMG_C])
    pixels = random_pixels(grid, seed=9)
    whole = ours25.get_vision_features(pixels, grid).asnumpy()
    # A budget of 10 query rows of the 140-patch frame (4 heads x 140 keys x 4 bytes each). Windows: the two of
    # 64 patches (one per image, batched) get 22400 / (2 x 4 x 64 x 4) = 10 rows a block, the one of 48
    # patches 29, those of 16 and 12 fit whole.
    monkeypatch.setattr(attention, "SCORES_BUDGET", 4 * 140 * 4 * 10)
    plan = ours25.visual.plan(grid)
    assert plan.frames.blocks[-1] == [(a, min(a + 10, 140)) for a in range(0, 140, 10)]
    assert [len(b) for b in plan.windows.blocks] == [1, 1, 2, 7]  # windows of 12, 16, 48 and 64 patches
    assert plan.windows.unpad is not None and plan.frames.unpad is not None
    blocked = ours25.get_vision_features(pixels, grid).asnumpy()
    assert rel_err(blocked, whole) < 1e-6
    with torch.no_grad():
        ref = hf25[0].model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert rel_err(blocked, ref) < 1e-5


def test_vision_steps_compile_once_for_every_size(ours25):
    """After one image, other sizes, a video and several images compile nothing more. (Counted from the
    first image on: the model is shared with earlier tests of this module, which also ran graph mode.)"""
    def vision_graphs():
        return {k: v for k, v in ours25.compiled_graphs().items() if k.startswith("vision.")}

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ours25.get_vision_features(random_pixels(np.array([IMG_A])), np.array([IMG_A]))
        first = vision_graphs()
        for grid in ([IMG_B, VID], [IMG_C], [IMG_C, IMG_A, IMG_B]):
            grid = np.array(grid)
            ours25.get_vision_features(random_pixels(grid), grid)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    # Under sdpa (the CPU's default) each block is one kernel (csrc/vision.cc): its step, not the two halves.
    assert {k for k, n in first.items() if n} == {"vision.embed", "vision.block_fused", "vision.merger"}
    assert vision_graphs() == first


def test_a_hot_size_runs_static_windows_and_frames_equal_to_hf(hf25, ours25, monkeypatch):
    """The static twins of the block steps (graphs.HotLayouts, promoted at once here: gain pinned high) run the
    windowed and the per-frame blocks, several images and a video, equal to HF's tower. (The block steps run
    where the CPU's block kernel does not apply: eager, float16, Ascend.)"""
    from mindone_qwen2vl.graphs import HotLayouts

    monkeypatch.setattr(ours25.visual, "block_kernels", lambda: None)

    grid = np.array([VID, IMG_A, IMG_C])
    pixels = random_pixels(grid, 5)
    kept = ours25.visual.hot_layouts
    ours25.visual.hot_layouts = hot = HotLayouts(gain=1e6)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        outs = [ours25.get_vision_features(pixels, grid).asnumpy() for _ in range(3)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        ours25.visual.hot_layouts = kept
    assert list(hot.hot) == [ours25.visual.layout(grid)] and hot.compiled == set(hot.hot)
    with torch.no_grad():
        ref = hf25[0].model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert rel_err(outs[0], ref) < 1e-5 and rel_err(outs[2], ref) < 1e-5


# ------------------------------------------------------------------------------------------------ rope
def test_rope_index_in_seconds_equals_hf_for_whole_seconds(hf25, ours25):
    inputs = case_inputs("mixed_left_padded_batch")
    args = (inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"])
    hf_args = {k: torch.from_numpy(inputs[k]) for k in ("input_ids", "image_grid_thw", "video_grid_thw",
                                                        "attention_mask")}
    for seconds in ([2.0], [1.0], [3.0]):
        pos, deltas = ours25.get_rope_index(*args, np.array(seconds))
        ref, ref_deltas = hf25[0].model.get_rope_index(**hf_args, second_per_grid_ts=torch.tensor(seconds))
        np.testing.assert_array_equal(pos, ref.numpy())
        np.testing.assert_array_equal(deltas, ref_deltas.numpy())
    # Without second_per_grid_ts, 1 s per grid step, as HF.
    pos, _ = ours25.get_rope_index(*args)
    np.testing.assert_array_equal(pos, hf25[0].model.get_rope_index(**hf_args)[0].numpy())


def test_rope_index_keeps_fractional_seconds():
    """0.5 s per grid step at 2 tokens/s puts frames at 0, 1, 2 (Qwen's reference and vLLM); HF 4.57.1 casts
    0.5 to 0 and puts them all at 0. The text after the video resumes past the last frame either way."""
    from mindone_qwen2vl.inputs import get_rope_index, temporal_positions

    assert temporal_positions(3, 0.5, 2).tolist() == [0, 1, 2]
    assert temporal_positions(4, 0.5, 25).tolist() == [0, 12, 25, 37]
    assert temporal_positions(3, 1 / 3, 3).tolist() == [0, 1, 2]  # float32 like the reference: 2/3*3 is 2
    ids = np.array([[1] + vision_block(VIDEO, (3, 2, 2)) + [2]])
    pos, deltas = get_rope_index(ids, video_grid_thw=np.array([(3, 2, 2)]), second_per_grid_ts=[0.5],
                                 tokens_per_second=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]  # start, frames 0..2 at 2 + time, end, text
    pos, _ = get_rope_index(ids, video_grid_thw=np.array([(3, 2, 2)]), second_per_grid_ts=[3.0], tokens_per_second=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 8, 14, 15, 16]  # 3 s x 2 tokens/s: 6 positions per grid step
    # Qwen2-VL (no tokens_per_second): frames count 0, 1, 2 whatever second_per_grid_ts says.
    pos, _ = get_rope_index(ids, video_grid_thw=np.array([(3, 2, 2)]), second_per_grid_ts=[3.0])
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    for bad in ([1.0, 2.0], [float("nan")], [-1.0], ["1"]):
        with pytest.raises(ValueError, match=r"second_per_grid_ts must hold one finite number >= 0 per video \(1\)"):
            get_rope_index(ids, video_grid_thw=np.array([(3, 2, 2)]), second_per_grid_ts=bad, tokens_per_second=2)


def test_bad_second_per_grid_ts_fails_before_the_vision_tower(ours25, monkeypatch):
    inputs = case_inputs("video")
    inputs["second_per_grid_ts"] = np.array([1.0, 2.0])
    monkeypatch.setattr(ours25, "get_vision_features", lambda *a: pytest.fail("the tower ran"), raising=False)
    for call in (ours25, lambda **kw: ours25.generate(**kw, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"second_per_grid_ts must hold one finite number >= 0 per video \(1\), "
                                             r"got \[1.0, 2.0\]"):
            call(**inputs)


def _bad_inputs():
    from test_inputs import BAD  # Qwen2-VL's table: the same vocabulary, patch width and merge size

    return BAD


@pytest.mark.parametrize("name,inputs,message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_inputs_are_named_before_any_work(ours25, monkeypatch, name, inputs, message):
    """Qwen2.5-VL's generate and forward check their inputs as Qwen2-VL's do (ids outside the vocabulary,
    negative ids, pixels of the wrong width, grids of the wrong shape, NaN pixels...), before the tower runs."""
    monkeypatch.setattr(ours25, "get_vision_features", lambda *a: pytest.fail("the tower ran"), raising=False)
    for call in (ours25.forward, lambda **kw: ours25.generate(**kw, max_new_tokens=2)):
        with pytest.raises(ValueError) as info:
            call(**inputs)
        assert message in str(info.value), (name, str(info.value))


def test_fractional_seconds_differ_from_hf_only_in_positions(hf25, ours25):
    """With 0.5 s per grid step our logits are HF's given our positions: the documented difference is the
    temporal positions, nothing else."""
    inputs = case_inputs("video")
    inputs["second_per_grid_ts"] = np.array([0.5])
    ours = ours25(**inputs)
    pos, _ = ours25.get_rope_index(inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"],
                                   second_per_grid_ts=inputs["second_per_grid_ts"])
    hf_pos, _ = hf25[0].model.get_rope_index(torch.from_numpy(inputs["input_ids"]),
                                             video_grid_thw=torch.from_numpy(inputs["video_grid_thw"]),
                                             second_per_grid_ts=torch.tensor([0.5]))
    assert (pos != hf_pos.numpy()).any()
    inputs.pop("second_per_grid_ts")
    ref = hf_logits(hf25[0], **inputs, position_ids=pos)
    assert rel_err(ours.logits.asnumpy(), ref) < TOL


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("case", ["several_images", "video", "mixed_left_padded_batch"])
def test_logits_match_hf(hf25, ours25, ms_mode, case):
    inputs = case_inputs(case)
    out = ours25(**inputs)
    ref = hf_logits(hf25[0], **inputs)
    mask = inputs.get("attention_mask")
    err = rel_err(out.logits.asnumpy(), ref, mask)
    print(f"{case} [{ms_mode}]: relative error {err:.2e}")
    assert err < TOL
    keep = mask.astype(bool) if mask is not None else ...
    assert (out.logits.asnumpy().argmax(-1) == ref.argmax(-1))[keep].all()


@pytest.mark.parametrize("mode,new", [("graph", 8), ("pynative", 3)])
def test_greedy_generate_matches_hf(hf25, ours25, mode, new):
    inputs = case_inputs("mixed_left_padded_batch")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        ours = ours25.generate(**inputs, max_new_tokens=new, eos_token_id=[])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    with torch.no_grad():
        ref = hf25[0].generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                               max_new_tokens=new, min_new_tokens=new, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_engine_takes_second_per_grid_ts(ours25, monkeypatch):
    """Engine.submit's second_per_grid_ts reaches the prompt's positions (its tokens are generate()'s), and a
    bad one is refused at submit."""
    from mindone_qwen2vl.engine import Engine

    inputs = case_inputs("video")
    inputs["second_per_grid_ts"] = np.array([3.0])
    want = ours25.generate(**inputs, max_new_tokens=4, eos_token_id=[])[0, inputs["input_ids"].shape[1]:].tolist()
    seen = []
    rope_index = ours25.get_rope_index
    monkeypatch.setattr(ours25, "get_rope_index", lambda *a: seen.append(a[4]) or rope_index(*a), raising=False)
    engine = Engine(ours25, max_batch=2, max_len=256).start()
    try:
        assert engine.submit(**inputs, max_new_tokens=4, eos_token_id=[]).result(300)[0] == want
        with pytest.raises(ValueError, match="second_per_grid_ts must hold one finite number"):
            engine.submit(**{**inputs, "second_per_grid_ts": [1.0, 1.0]}, max_new_tokens=4)
    finally:
        engine.stop()
    assert [np.asarray(s).tolist() for s in seen] == [[3.0]]  # the prefill's positions


# ------------------------------------------------------------------------------------------------ loading
def test_untied_new_key_names_load(tmp_path):
    """7B-like (untied lm_head) with transformers >= 4.52's key names `model.language_model.*` /
    `model.visual.*`."""
    hf = hf_model(hf_config_2_5(tied=False, vision_depth=2, fullatt=(0,), tokens_per_second=TPS), seed=12)
    folder = save_checkpoint(hf, str(tmp_path / "untied"), new_names=True)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.visual.merger.ln_q.weight" in keys
    assert "model.language_model.embed_tokens.weight" in keys
    ours = load(folder)
    assert not ours.config.tie_word_embeddings
    inputs = case_inputs("video")
    assert rel_err(ours(**inputs).logits.asnumpy(), hf_logits(hf, **inputs)) < TOL


@pytest.fixture(scope="module")
def flash25(tmp_path_factory):
    """(HF model, our model under flash_attention_2 with the emulated kernel): head sizes multiples of 16, as the
    kernel needs (vision 32 / 2 heads, text 64 / 4)."""
    import flash_emulation
    from mindone_qwen2vl.precision import PrecisionPolicy

    policy = PrecisionPolicy(attn_implementation="flash_attention_2", flash_dtype=ms.float32,
                             flash_kernel=flash_emulation.emulated_flash_attention_score)
    hf = hf_model(hf_config_2_5(vision_heads=2, tokens_per_second=TPS), seed=13)
    return hf, load(save_checkpoint(hf, tmp_path_factory.mktemp("tiny_qwen2_5_vl_flash")), policy=policy)


def test_flash_windows_are_batches_of_equal_length(flash25):
    """flash_attention_2 runs windows and frames as batches of equal-length segments, BNSD, no mask."""
    import flash_emulation

    flash_emulation.CALLS.clear()
    grid = np.array([IMG_A])
    flash25[1].get_vision_features(random_pixels(grid), grid)
    # Block 0 windowed: windows of 16, 12, 4 and 3 merged tokens (64, 48, 16, 12 patches), one call per length;
    # block 1 (full attention): the 140-patch frame; block 2 windowed again.
    windowed = [("BNSD", 0, (1, 2, n, 16), (1, 2, n, 16), None) for n in (12, 16, 48, 64)]
    calls = list(flash_emulation.CALLS)
    flash_emulation.CALLS.clear()
    assert calls == windowed + [("BNSD", 0, (1, 2, 140, 16), (1, 2, 140, 16), None)] + windowed


def test_flash_path_equals_hf(flash25):
    """The whole model under flash attention, in graph mode (the Ascend default; pynative runs the emulation op
    by op, slowly, and its vision calls are checked above)."""
    hf, flash = flash25
    inputs = case_inputs("mixed_left_padded_batch")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        logits = flash(**inputs).logits.asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    err = rel_err(logits, hf_logits(hf, **inputs), inputs["attention_mask"])
    print(f"flash (emulated) [graph]: {err:.2e}")
    assert err < TOL


def test_conversion_round_trip(hf25, tmp_path):
    from mindone_qwen2vl.convert import convert_checkpoint

    dst = tmp_path / "ms"
    convert_checkpoint(hf25[1], str(dst), progress=False)
    converted = load(dst)
    from mindone_qwen2vl.config import Qwen2_5_VLConfig

    assert isinstance(converted.config, Qwen2_5_VLConfig) and converted.config.tie_word_embeddings
    inputs = case_inputs("video")
    assert rel_err(converted(**inputs).logits.asnumpy(), hf_logits(hf25[0], **inputs)) < TOL


# ------------------------------------------------------------------------------------------------ real shapes
def test_3b_parameters_are_hf_tensors_by_name_and_shape():
    """Built from the real 3B config (placeholders: no weight memory), the model reads exactly the tensors of
    HF's model of that config, under their names and shapes (HF's built on the meta device)."""
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    from mindone_qwen2vl import Qwen2_5_VLForConditionalGeneration
    from mindone_qwen2vl.config import load_config
    from mindone_qwen2vl.loading import canonical_name, expected_tensors, parameter_pieces

    path = os.path.join(ASSETS, "qwen2.5-vl-3b-instruct", "config.json")
    ours = expected_tensors(parameter_pieces(Qwen2_5_VLForConditionalGeneration(load_config(path))))
    with torch.device("meta"):
        hf = HFModel(HFConfig.from_pretrained(path))
    # HF's names as its checkpoints store them (4.57 maps model.language_model/model.visual back on save).
    theirs = {canonical_name(k): tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert ours == theirs
    assert ours["visual.blocks.0.mlp.gate_proj.weight"] == (3420, 1280)
    assert ours["visual.merger.mlp.2.weight"] == (2048, 5120)


def test_fp16_close_to_hf_fp64(hf25):
    hf, folder = hf25
    ours = load(folder, mindspore_dtype=ms.float16)
    block = ours.visual.blocks[0]
    assert block.mlp.gate_proj.weight.dtype == ms.float16 and block.norm1.weight.dtype == ms.float32
    assert ours.visual.merger.ln_q.weight.dtype == ms.float32
    inputs = case_inputs("mixed_left_padded_batch")
    logits = ours(**inputs).logits.asnumpy()
    with torch.no_grad():
        ref = hf.double()(**{k: torch.from_numpy(np.asarray(v)).double() if np.asarray(v).dtype.kind == "f"
                             else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    hf.float()
    err = rel_err(logits, ref, inputs["attention_mask"])
    print(f"fp16: relative error vs HF fp64 {err:.2e}")
    assert np.isfinite(logits).all() and err < 3e-2
