"""Whole-model logits against HF transformers (fp32), in pynative and graph mode."""
import mindspore as ms
import numpy as np
import pytest

from tiny import IMAGE, VIDEO, hf_logits, left_pad, random_pixels, rel_err, vision_block

TOL = 1e-4
IMG_A, IMG_B, VID = (1, 4, 6), (1, 8, 4), (3, 4, 4)


def case_inputs(name):
    """(inputs dict for both models, attention mask or None)."""
    if name == "image":
        ids = [[1, 2] + vision_block(IMAGE, IMG_A) + [3, 4, 5]]
        return dict(input_ids=np.array(ids), pixel_values=random_pixels([IMG_A], 2), image_grid_thw=np.array([IMG_A]))
    if name == "several_images":
        ids = [[1] + vision_block(IMAGE, IMG_A) + [2] + vision_block(IMAGE, IMG_B) + [3]]
        grid = np.array([IMG_A, IMG_B])
        return dict(input_ids=np.array(ids), pixel_values=random_pixels(grid, 3), image_grid_thw=grid)
    if name == "video":
        ids = [[1, 2] + vision_block(VIDEO, VID) + [3, 4]]
        return dict(input_ids=np.array(ids), pixel_values_videos=random_pixels([VID], 4),
                    video_grid_thw=np.array([VID]))
    if name == "text_only":
        return dict(input_ids=np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]]))
    if name == "mixed_left_padded_batch":
        ids, mask = left_pad([
            [1, 2] + vision_block(IMAGE, IMG_A) + [3],
            [7] + vision_block(VIDEO, VID) + [8, 9],
            [4, 5, 6],
            vision_block(IMAGE, IMG_B) + [9],
        ])
        grid = np.array([IMG_A, IMG_B])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(grid, 5), image_grid_thw=grid,
                    pixel_values_videos=random_pixels([VID], 6), video_grid_thw=np.array([VID]))
    raise KeyError(name)


CASES = ["image", "several_images", "video", "text_only", "mixed_left_padded_batch"]


@pytest.fixture(params=["sdpa", "eager"])
def attn_ours(request, tiny_ours, tiny_eager):
    """The tiny model with the CPU's default attention (sdpa) and with eager attention."""
    return tiny_ours if request.param == "sdpa" else tiny_eager


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(tiny_hf, attn_ours, ms_mode, case):
    inputs = case_inputs(case)
    ours = attn_ours(**inputs).logits
    assert isinstance(ours, ms.Tensor) and ours.dtype == ms.float32
    ref = hf_logits(tiny_hf[0], **inputs)
    assert ours.shape == ref.shape
    mask = inputs.get("attention_mask")
    err = rel_err(ours.asnumpy(), ref, mask)
    print(f"{case} [{ms_mode}]: relative error {err:.2e}")
    assert err < TOL
    assert (ours.asnumpy().argmax(-1) == ref.argmax(-1))[mask.astype(bool) if mask is not None else ...].all()
    if mask is not None:  # each row runs without its padding: padding positions keep zero logits
        assert not ours.asnumpy()[mask == 0].any()


def test_pynative_and_graph_agree(tiny_ours):
    inputs = case_inputs("mixed_left_padded_batch")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        a = tiny_ours(**inputs).logits.asnumpy()
        ms.set_context(mode=ms.GRAPH_MODE)
        b = tiny_ours(**inputs).logits.asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    err = rel_err(a, b, inputs["attention_mask"])
    print(f"pynative vs graph: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("convert", [
    lambda a: a.astype(np.int32),
    lambda a: a.astype(np.int64),
    lambda a: ms.Tensor(a.astype(np.int32)),
    lambda a: ms.Tensor(a.astype(np.int64)),
], ids=["np_int32", "np_int64", "ms_int32", "ms_int64"])
def test_forward_takes_numpy_and_tensors(tiny_ours, convert):
    inputs = case_inputs("image")
    base = tiny_ours(**inputs).logits.asnumpy()
    inputs = {k: (convert(v) if k in ("input_ids", "image_grid_thw") else ms.Tensor(v)) for k, v in inputs.items()}
    np.testing.assert_array_equal(tiny_ours(**inputs).logits.asnumpy(), base)


def test_rope_deltas_returned(tiny_ours):
    inputs = case_inputs("video")
    out = tiny_ours(**inputs)
    # 2 text + start + 3x2x2 video tokens (positions span max(3, 2, 2)) + end + 2 text.
    assert out.rope_deltas.tolist() == [[(2 + 1 + 3 + 1 + 2) - (2 + 1 + 12 + 1 + 2)]]


def test_mismatched_image_tokens_and_features(tiny_ours):
    inputs = case_inputs("image")
    inputs["input_ids"] = np.array([[1, 2] + vision_block(IMAGE, IMG_A)[:-3] + [151653]])
    with pytest.raises(ValueError, match=r"Image features and image tokens do not match: tokens: 4, features: 6"):
        tiny_ours(**inputs)


def test_video_tokens_without_pixels(tiny_ours):
    inputs = case_inputs("video")
    inputs.pop("pixel_values_videos")
    with pytest.raises(ValueError, match="pixel_values_videos and video_grid_thw go together: got only video_grid_thw"):
        tiny_ours(**inputs)
    inputs.pop("video_grid_thw")
    with pytest.raises(ValueError, match="input_ids hold 12 video tokens but no video pixel values were given"):
        tiny_ours(**inputs)


def test_logits_to_keep(tiny_ours):
    inputs = case_inputs("image")
    full = tiny_ours(**inputs).logits.asnumpy()
    last = tiny_ours(**inputs, logits_to_keep=2).logits.asnumpy()
    assert last.shape == (1, 2, full.shape[-1])
    np.testing.assert_allclose(last, full[:, -2:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1.5, True, np.array([3, 4])])
def test_logits_to_keep_must_be_a_count(tiny_ours, bad):
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int >= 0 .*got"):
        tiny_ours(**case_inputs("text_only"), logits_to_keep=bad)


@pytest.mark.parametrize("keep", [1, 3, 100])
def test_logits_to_keep_runs_the_last_layer_on_those_positions_only(tiny_hf, tiny_ours, ms_mode, keep):
    """With logits_to_keep=n the last decoder layer attends, projects and runs its MLP for the last n positions
    of the padded batch only (Qwen2VLTextModel.prompt(keep_last=...), row by row without padding); that is the
    full computation: HF's logits, padded batch."""
    inputs = case_inputs("mixed_left_padded_batch")
    batch, seq = inputs["input_ids"].shape
    n = min(keep, seq)
    ref = hf_logits(tiny_hf[0], **inputs)[:, -n:]
    ours = tiny_ours(**inputs, logits_to_keep=keep).logits.asnumpy()
    assert ours.shape == (batch, n, ref.shape[-1])
    kept_mask = inputs["attention_mask"][:, -n:]
    err = rel_err(ours, ref, kept_mask)
    print(f"logits_to_keep={keep} [{ms_mode}]: relative error {err:.2e}")
    assert err < TOL
    assert not ours[kept_mask == 0].any()
    # The text model hands back only each row's kept positions: the last layer never made the others.
    mask = inputs["attention_mask"]
    embeds = tiny_ours.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                             inputs["pixel_values_videos"], inputs["video_grid_thw"])
    position_ids, _ = tiny_ours.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"],
                                               inputs["video_grid_thw"], mask)
    shapes = {row: hidden.shape for row, hidden, _ in tiny_ours.prompt_rows(embeds, position_ids, mask, keep_last=keep)}
    hidden_size = tiny_ours.config.text_config.hidden_size
    assert shapes == {row: (int(kept_mask[row].sum()), hidden_size) for row in range(batch)}
    # One row through the text model: keep_last=k gives k positions, the same as the last k of the whole row.
    row = 1
    real = np.nonzero(mask[row])[0]
    row_embeds = ms.ops.gather(embeds.reshape(batch * seq, -1), ms.Tensor((row * seq + real).astype(np.int32)), 0)
    whole, _ = tiny_ours.model.prompt(row_embeds, position_ids[:, row, real])
    last, _ = tiny_ours.model.prompt(row_embeds, position_ids[:, row, real], keep_last=min(keep, len(real)))
    assert whole.shape == (len(real), hidden_size) and last.shape == (min(keep, len(real)), hidden_size)
    np.testing.assert_allclose(last.asnumpy(), whole.asnumpy()[-last.shape[0]:], rtol=0, atol=1e-5)


def hf_mrope_tables(hf_model, position_ids):
    """HF's cos/sin [3, S] positions -> [S, head_dim], each frequency taken from its M-RoPE axis."""
    import torch

    text = hf_model.model.language_model
    section = text.config.rope_scaling["mrope_section"] * 2
    pos = torch.from_numpy(position_ids.astype(np.int64))[:, None]  # [3, 1, S]
    cos, sin = text.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(section, -1))], -1)[0].numpy()  # noqa: E731
    return pick(cos), pick(sin)


def test_rotary_tables_match_hf(tiny_hf, tiny_ours, ms_mode):
    """The decoder's rotary tables (one path for prompts and decode steps: Qwen2VLRotaryEmbedding) are HF's M-RoPE
    tables, with one row per head of the packed q/k/v projection: query rows carry the attention scale, key rows
    are the plain tables, value rows are cos 1 / sin 0. Far positions included (float32 angles, as HF)."""
    rng = np.random.default_rng(0)
    position_ids = np.concatenate([np.broadcast_to(np.arange(6), (3, 6)),
                                   np.array([[7, 7, 7], [7, 8, 9], [7, 9, 8]]),
                                   rng.integers(0, 32768, (3, 7))], axis=1)
    cos, sin = tiny_ours.model.steps["rotary"](ms.Tensor(position_ids.astype(np.int32)[:, None]))
    cos, sin = cos.asnumpy(), sin.asnumpy()
    text = tiny_ours.config.text_config
    heads, kv, d = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    assert cos.shape == sin.shape == (position_ids.shape[1], heads + 2 * kv, d)
    ref_cos, ref_sin = hf_mrope_tables(tiny_hf[0], position_ids)
    scale = np.float32(d) ** np.float32(-0.5)
    for ours, ref in ((cos, ref_cos), (sin, ref_sin)):
        np.testing.assert_allclose(ours[:, :heads], np.broadcast_to(ref[:, None] * scale, ours[:, :heads].shape),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours[:, heads:heads + kv], np.broadcast_to(ref[:, None], (len(ref), kv, d)),
                                   rtol=0, atol=1e-6)
    assert (cos[:, heads + kv:] == 1).all() and (sin[:, heads + kv:] == 0).all()


@pytest.mark.parametrize("rows", [2, 5])
def test_prompt_query_blocks_are_exact(tiny_hf, tiny_eager, ms_mode, monkeypatch, rows):
    """The decoder's prompt attention in query blocks (long prompts on the eager path) equals one block and HF,
    in a padded batch (each row runs on its own, without its padding, so each has its own blocks)."""
    from mindone_qwen2vl import attention

    inputs = case_inputs("mixed_left_padded_batch")
    whole = tiny_eager(**inputs).logits.asnumpy()
    seq = inputs["input_ids"].shape[1]
    heads = tiny_eager.config.text_config.num_attention_heads
    # A budget of `rows` query rows of heads x seq float32 scores for the longest row (its length is seq).
    monkeypatch.setattr(attention, "SCORES_BUDGET", heads * seq * 4 * rows)
    blocks = attention.query_blocks(seq, seq, heads)
    assert blocks == [(a, min(a + rows, seq)) for a in range(0, seq, rows)] and len(blocks) > 2
    blocked = tiny_eager(**inputs).logits.asnumpy()
    mask = inputs["attention_mask"]
    assert rel_err(blocked, whole, mask) < 1e-6
    ref = hf_logits(tiny_hf[0], **inputs)
    assert rel_err(blocked, ref, mask) < TOL
    assert (blocked.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].all()


@pytest.mark.parametrize("case,host_rows", [("mixed_left_padded_batch", None), ("long_text", 20)])
def test_prompt_causal_blocks_are_exact(tiny_hf, tiny_eager, ms_mode, monkeypatch, case, host_rows):
    """A long prompt attends in causal blocks within one graph, each block over the keys up to its own last
    position: the logits equal one block's and HF's, with per-head masks (a padded batch, whose 17-token row
    takes the blocks) and, inside the host's query blocks (host_rows), with masks shared by the heads; greedy
    generation through it equals HF's."""
    from mindone_qwen2vl import attention
    from test_generation import hf_generate

    n = attention.CAUSAL_BLOCKS
    if case == "long_text":
        ids = np.arange(5, 45)[None]
        inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    else:
        inputs = case_inputs(case)
    whole = tiny_eager(**inputs).logits.asnumpy()
    seq = inputs["input_ids"].shape[1]
    heads = tiny_eager.config.text_config.num_attention_heads
    monkeypatch.setattr(attention, "CAUSAL_FROM", 0)
    if host_rows:
        monkeypatch.setattr(attention, "SCORES_BUDGET", heads * seq * 4 * host_rows)
        assert attention.query_blocks(seq, seq, heads) == [(0, host_rows), (host_rows, seq)]
    assert attention.causal_blocks(host_rows or seq, host_rows or seq, heads) == n
    assert attention.causal_blocks(n - 1, n - 1, heads) == 1  # fewer queries than blocks: one block
    blocked = tiny_eager(**inputs).logits.asnumpy()
    mask = inputs["attention_mask"]
    assert rel_err(blocked, whole, mask) < 1e-5
    ref = hf_logits(tiny_hf[0], **inputs)
    assert rel_err(blocked, ref, mask) < TOL
    assert (blocked.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].all()
    if ms_mode == "graph":
        step = f"text.attend{'_shared_mask' if host_rows else ''}.{n}"
        assert tiny_eager.compiled_graphs()[step] == 1
        ours = tiny_eager.generate(**inputs, max_new_tokens=4)
        np.testing.assert_array_equal(ours, hf_generate(tiny_hf[0], inputs, max_new_tokens=4))
