"""generate() against HF transformers' generate (greedy, fp32) on the tiny random checkpoint, in pynative and
graph mode; the decode step compiles once."""
import itertools

import mindspore as ms
import numpy as np
import pytest
import torch


from tiny import IMAGE, VIDEO, left_pad, random_pixels, vision_block

IMG, IMG_B, VID = (1, 4, 6), (1, 8, 4), (3, 4, 4)
# Pynative runs op by op on the CPU (slow): fewer tokens there.
NEW_TOKENS = {"pynative": 4, "graph": 12}


def case_inputs(name):
    if name == "image":
        return dict(input_ids=np.array([[1, 2] + vision_block(IMAGE, IMG) + [3, 4, 5]]),
                    pixel_values=random_pixels([IMG], 2), image_grid_thw=np.array([IMG]))
    if name == "video":
        return dict(input_ids=np.array([[1, 2] + vision_block(VIDEO, VID) + [3, 4]]),
                    pixel_values_videos=random_pixels([VID], 4), video_grid_thw=np.array([VID]))
    if name == "text_only":
        return dict(input_ids=np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]]))
    if name == "mixed_left_padded_batch":
        ids, mask = left_pad([
            [1, 2] + vision_block(IMAGE, IMG) + [3],
            [7] + vision_block(VIDEO, VID) + [8, 9],
            [4, 5, 6],
            vision_block(IMAGE, IMG_B) + [9],
        ])
        grid = np.array([IMG, IMG_B])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(grid, 5), image_grid_thw=grid,
                    pixel_values_videos=random_pixels([VID], 6), video_grid_thw=np.array([VID]))
    raise KeyError(name)


def hf_generate(hf_model, inputs, **options):
    options.setdefault("do_sample", False)
    with torch.no_grad():
        out = hf_model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **options)
    return out.numpy()


@pytest.mark.parametrize("case", ["image", "video", "text_only", "mixed_left_padded_batch"])
def test_greedy_matches_hf(tiny_hf, tiny_ours, ms_mode, case):
    inputs = case_inputs(case)
    n = NEW_TOKENS[ms_mode]
    ours = tiny_ours.generate(**inputs, max_new_tokens=n)
    ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n)


def test_repetition_penalty_matches_hf(tiny_hf, tiny_ours, ms_mode):
    inputs = case_inputs("image")
    n = NEW_TOKENS[ms_mode] + 2
    plain = hf_generate(tiny_hf[0], inputs, max_new_tokens=n)
    ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n, repetition_penalty=1.5)
    assert not np.array_equal(plain, ref)  # the tiny model repeats itself: the penalty changes its output
    ours = tiny_ours.generate(**inputs, max_new_tokens=n, repetition_penalty=1.5)
    np.testing.assert_array_equal(ours, ref)


def pick_eos(rows, n):
    """Token ids from a greedy run that end every row before the last step, not all at the same step."""
    first = []  # per row: token -> the step it first appears
    for row in rows:
        seen = {}
        for step, tok in enumerate(row.tolist()):
            seen.setdefault(tok, step)
        first.append(seen)
    best = None
    for choice in itertools.product(*[sorted(f, key=f.get)[:4] for f in first]):
        stops = [min(f.get(t, n) for t in choice) for f in first]
        if max(stops) < n - 1 and len(set(stops)) >= 2:
            spread = len(set(stops))
            if best is None or spread > best[0]:
                best = (spread, sorted(set(int(t) for t in choice)), stops)
    assert best is not None, f"no eos choice stops the rows at different steps: {rows}"
    return best[1], best[2]


def test_eos_list_stops_rows_at_different_steps(tiny_hf, tiny_ours):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        inputs = case_inputs("mixed_left_padded_batch")
        n, seq, pad = 10, inputs["input_ids"].shape[1], 151643
        free = tiny_ours.generate(**inputs, max_new_tokens=n, eos_token_id=[])[:, seq:]
        eos, stops = pick_eos(free, n)
        print(f"eos {eos}: rows stop at steps {stops} of {n}")
        ours = tiny_ours.generate(**inputs, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        np.testing.assert_array_equal(ours, ref)
        # Each row ends at its own eos, then holds padding; the call stops when the last row has ended.
        assert ours.shape[1] == seq + max(stops) + 1 < seq + n
        for r, stop in enumerate(stops):
            assert ours[r, seq + stop] in eos
            assert (ours[r, seq + stop + 1:] == pad).all()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_prompts_one_after_another(tiny_hf, tiny_ours, ms_mode):
    """Different rope_deltas (image, video, text) on one model and one cache: nothing stale between calls."""
    n = NEW_TOKENS[ms_mode]
    for case in ["image", "video", "text_only", "image"]:
        inputs = case_inputs(case)
        np.testing.assert_array_equal(tiny_ours.generate(**inputs, max_new_tokens=n),
                                      hf_generate(tiny_hf[0], inputs, max_new_tokens=n), err_msg=case)


def test_decode_step_compiles_once(tiny_ours):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        first = case_inputs("text_only")
        steps = tiny_ours.model.layer_step.compile_cache
        before = len(steps)  # other tests may have compiled prompt shapes already
        out = tiny_ours.generate(**first, max_new_tokens=40, eos_token_id=[])
        # Every decoder layer of the prompt ran the one shared layer step: at most one new graph.
        after_first = len(steps)
        assert after_first >= 1 and after_first - before <= 1
        assert out.shape[1] == first["input_ids"].shape[1] + 40
        key = (1, 128)
        assert compiled_graphs(tiny_ours)[key]["decode"] == 1
        # A prompt of another length (graph mode pads prompts to a multiple of 64) reuses both graphs.
        tiny_ours.generate(input_ids=np.array([[5, 6, 7]]), max_new_tokens=30, eos_token_id=[])
        assert compiled_graphs(tiny_ours)[key] == {"prefill": 1, "decode": 1}
        assert len(steps) == after_first  # the same padded prompt shape
        # The decode step holds the model as plain attributes: a call walks no sub-cells on the host.
        runner = tiny_ours._generation_runners[key]
        assert [name for name, _ in runner.decode.cells_and_names()] == [""]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_ms_tensor_in_ms_tensor_out(tiny_ours):
    inputs = case_inputs("text_only")
    out = tiny_ours.generate(input_ids=ms.Tensor(inputs["input_ids"]), max_new_tokens=2)
    assert isinstance(out, ms.Tensor) and out.dtype == ms.int64
    np.testing.assert_array_equal(out.asnumpy()[:, :8], inputs["input_ids"])


@pytest.fixture(scope="module")
def flash_pair(tmp_path_factory):
    """The same checkpoint loaded with eager and with flash attention (the kernel emulated on CPU, in fp32).
    The emulated kernel wants head sizes that are multiples of 16: vision 32/2, text 64/4."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.precision import PrecisionPolicy
    from tiny import hf_config, hf_model, save_checkpoint

    folder = save_checkpoint(hf_model(hf_config(vision_heads=2), seed=7), str(tmp_path_factory.mktemp("flash")))
    eager = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False)
    flash = Qwen2VLForConditionalGeneration.from_pretrained(
        folder, progress=False, policy=PrecisionPolicy(attn_implementation="flash_attention_2", flash_dtype=ms.float32))
    return eager, flash


def test_flash_attention_path_generates_the_same(flash_pair):
    """The Ascend default: the prefill mask over the prompt and the decode masks over the cache bucket go
    through flash_attention_score.
    Pynative only: there the emulation logs its calls (and graph mode would compile two more models)."""
    import flash_emulation
    from mindone_qwen2vl.attention import FLASH_KERNEL

    eager, flash = flash_pair
    inputs = case_inputs("mixed_left_padded_batch")
    n = NEW_TOKENS["pynative"]
    FLASH_KERNEL["fn"] = flash_emulation.emulated_flash_attention_score
    flash_emulation.CALLS.clear()
    try:
        ours = flash.generate(**inputs, max_new_tokens=n)
    finally:
        FLASH_KERNEL["fn"] = None
    seq = inputs["input_ids"].shape[1]
    bnsd = [call for call in flash_emulation.CALLS if call[0] == "BNSD"]
    # (query length, key length): the prompt over its own keys (the last layer: its last position only), then
    # one token over the whole cache bucket
    assert {(call[2][2], call[3][2]) for call in bnsd} == {(seq, seq), (1, seq), (1, 128)}
    assert {call[2][3] for call in bnsd} == {16}  # head_dim
    np.testing.assert_array_equal(ours, eager.generate(**inputs, max_new_tokens=n))
