"""inputs.py: the model's inputs checked at the API before any work, each problem named; calls from several
threads at once give each caller its own sequential answer, in both modes."""
import threading

import mindspore as ms
import numpy as np
import pytest

from test_generation import case_inputs
from tiny import IMAGE, PATCH_DIM, random_pixels, vision_block

IMG = (1, 4, 6)


def image_inputs(**change):
    inputs = dict(input_ids=np.array([[1, 2] + vision_block(IMAGE, IMG) + [3]]), pixel_values=random_pixels([IMG], 1),
                  image_grid_thw=np.array([IMG]))
    inputs.update(change)
    return inputs


BAD = [
    ("id past the vocabulary", dict(input_ids=np.array([[1, 1000000, 3]])), "input_ids must be token ids in [0, 151936)"
     " (the vocabulary), found 1000000 at [0, 1]"),
    ("negative id", dict(input_ids=np.array([[1, -5, 3]])), "found -5 at [0, 1]"),
    ("float ids", dict(input_ids=np.array([[1.0, 2.0]])), "input_ids must hold integers, got dtype float64"),
    ("empty prompt", dict(input_ids=np.zeros((1, 0), np.int64)), "input_ids is empty (shape (1, 0))"),
    # The processor's output for an empty text: float64 [1, 0]; the emptiness is the problem to name.
    ("empty prompt, as the processor gives it", dict(input_ids=np.zeros((1, 0))), "input_ids is empty"),
    ("no rows", dict(input_ids=np.zeros((0, 5), np.int64)), "input_ids is empty (shape (0, 5))"),
    ("3-D ids", dict(input_ids=np.zeros((1, 2, 3), np.int64)), "input_ids must be [batch, seq]"),
    ("mask of another shape", dict(input_ids=np.array([[1, 2, 3]]), attention_mask=np.ones((1, 2), np.int64)),
     "attention_mask must have the shape of input_ids (1, 3), got (1, 2)"),
    ("mask not 0/1", dict(input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 2, 1]])),
     "attention_mask must hold 0 and 1 only, found [2]"),
    ("pixels of the wrong width", image_inputs(pixel_values=np.zeros((24, 100), np.float32)),
     f"pixel_values must be [24, {PATCH_DIM}] for image_grid_thw [[1, 4, 6]]"),
    ("pixels without a grid", image_inputs(image_grid_thw=None), "pixel_values and image_grid_thw go together"),
    ("grid of the wrong shape", image_inputs(image_grid_thw=np.array([[1, 4]])),
     "image_grid_thw must be [items, 3] (t, h, w per image), got shape (1, 2)"),
    ("odd grid", image_inputs(image_grid_thw=np.array([[1, 5, 6]])),
     "image_grid_thw row 0 is [1, 5, 6]: t, h and w must be >= 1 and h, w multiples of 2"),
    ("NaN pixels", image_inputs(pixel_values=np.full((24, PATCH_DIM), np.nan, np.float32)),
     f"pixel_values holds {24 * PATCH_DIM} values that are not finite"),
    ("integer pixels", image_inputs(pixel_values=np.zeros((24, PATCH_DIM), np.int64)),
     "pixel_values must be floating point"),
    ("ragged ids", dict(input_ids=[[1, 2, 3], [1, 2]]), "input_ids must be a rectangular array of numbers"),
    ("uint64 id beyond int64", dict(input_ids=np.array([[1, 2 ** 64 - 1]], np.uint64)),
     "input_ids holds 18446744073709551615, beyond any valid value"),
    ("grid whose patch count overflows int64", image_inputs(image_grid_thw=np.array([[1, 2 ** 40, 2 ** 40]])),
     f"pixel_values must be [1208925819614629174706176, {PATCH_DIM}]"),
]


@pytest.mark.parametrize("name,inputs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_named_before_any_work(tiny_ours, name, inputs, message):
    for call in (tiny_ours.generate, tiny_ours.forward):
        with pytest.raises(ValueError) as info:
            call(**inputs) if call == tiny_ours.forward else call(**inputs, max_new_tokens=2)
        assert message in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_threads_get_their_sequential_answers(tiny_ours, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        cases = ["image", "video", "text_only", "mixed_left_padded_batch"]
        n = 3
        expected = {case: tiny_ours.generate(**case_inputs(case), max_new_tokens=n) for case in cases}
        results, errors = {}, []

        def work(case, repeat):
            try:
                results[case, repeat] = tiny_ours.generate(**case_inputs(case), max_new_tokens=n)
            except BaseException as error:  # reported below, with the thread's case
                errors.append((case, repr(error)))

        threads = [threading.Thread(target=work, args=(case, r)) for r in range(2) for case in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        for (case, _), out in results.items():
            np.testing.assert_array_equal(out, expected[case], err_msg=case)
        assert len(results) == len(threads)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


VISION_BAD = [
    (np.zeros((24, 100), np.float32), [IMG], f"pixel_values must be [24, {PATCH_DIM}] for grid_thw [[1, 4, 6]]"),
    (np.full((24, PATCH_DIM), np.nan, np.float32), [IMG], "pixel_values holds"),
    (random_pixels([IMG], 1), [[1, 4]], "grid_thw must be [items, 3]"),
    (random_pixels([IMG], 1), [[1, 2 ** 40, 2 ** 40]], "pixel_values must be [1208925819614629174706176,"),
]


@pytest.mark.parametrize("pixels,grid,message", VISION_BAD)
def test_vision_features_check_their_inputs(tiny_ours, pixels, grid, message):
    """get_vision_features is public: the same named checks as generate's, never MindSpore's C++ error."""
    with pytest.raises(ValueError) as info:
        tiny_ours.get_vision_features(pixels, np.array(grid))
    assert message in str(info.value)


def test_bf16_and_torch_inputs_are_accepted(tiny_ours):
    """pixel_values in bfloat16 (a MindSpore or torch tensor; numpy has no bf16) are read as float32, exactly."""
    import torch

    inputs = image_inputs()
    pixels = inputs["pixel_values"]
    as_bf16 = torch.from_numpy(pixels).to(torch.bfloat16)
    exact = as_bf16.float().numpy()
    want = tiny_ours.forward(**image_inputs(pixel_values=exact)).logits.asnumpy()
    for given in (as_bf16, ms.Tensor(exact).astype(ms.bfloat16)):
        got = tiny_ours.forward(**image_inputs(pixel_values=given, input_ids=torch.from_numpy(inputs["input_ids"])))
        np.testing.assert_array_equal(got.logits.asnumpy(), want)


def test_float32_pixels_are_read_in_place_and_left_as_they_were(tiny_ours):
    """Checked float32 pixels are the caller's own array (no copy of up to 47 MB a large image), and neither a
    forward nor a generation writes into it; other float dtypes are converted."""
    from mindone_qwen2vl.inputs import check_media

    inputs = image_inputs()
    pixels = inputs["pixel_values"].astype(np.float32)
    kept = pixels.copy()
    checked, _ = check_media(tiny_ours.config, pixels, inputs["image_grid_thw"])
    assert checked is pixels
    assert check_media(tiny_ours.config, pixels.astype(np.float64), inputs["image_grid_thw"])[0].dtype == np.float32
    inputs["pixel_values"] = pixels
    tiny_ours(**inputs)
    tiny_ours.generate(**inputs, max_new_tokens=2)
    np.testing.assert_array_equal(pixels, kept)
