"""get_rope_index (host numpy) against HF's torch implementation: identical position ids and deltas."""
import numpy as np
import pytest
import torch

from mindone_qwen2vl.inputs import get_rope_index
from tiny import IMAGE, VIDEO, left_pad, vision_block


def hf_rope_index(hf_model, ids, image_grid=None, video_grid=None, mask=None):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    pos, deltas = hf_model.model.get_rope_index(t(ids), t(image_grid), t(video_grid), t(mask))
    return pos.numpy(), deltas.numpy()


IMG_A, IMG_B, VID = (1, 4, 6), (1, 8, 4), (3, 4, 4)

CASES = {
    "text_only": ([[5, 6, 7, 8, 9]], None, None),
    "one_image": ([[1, 2] + vision_block(IMAGE, IMG_A) + [3, 4]], [IMG_A], None),
    "two_images": ([[1] + vision_block(IMAGE, IMG_A) + [2] + vision_block(IMAGE, IMG_B) + [3]], [IMG_A, IMG_B], None),
    "video": ([[1, 2] + vision_block(VIDEO, VID) + [3]], None, [VID]),
    "image_and_video": ([[1] + vision_block(VIDEO, VID) + [2] + vision_block(IMAGE, IMG_A) + [3, 4]], [IMG_A], [VID]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_matches_hf(tiny_hf, case):
    rows, image_grid, video_grid = CASES[case]
    ids = np.array(rows, np.int64)
    ours = get_rope_index(ids, image_grid, video_grid)
    ref = hf_rope_index(tiny_hf[0], ids, image_grid, video_grid)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_rope_index_left_padded_batch(tiny_hf):
    # Rows of different lengths and kinds: image, video, text only, two images.
    rows = [
        [1, 2] + vision_block(IMAGE, IMG_A) + [3],
        [7] + vision_block(VIDEO, VID) + [8, 9],
        [4, 5, 6],
        vision_block(IMAGE, IMG_B) + [9] + vision_block(IMAGE, IMG_A),
    ]
    ids, mask = left_pad(rows)
    image_grid, video_grid = [IMG_A, IMG_B, IMG_A], [VID]
    ours = get_rope_index(ids, image_grid, video_grid, mask)
    ref = hf_rope_index(tiny_hf[0], ids, image_grid, video_grid, mask)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_rope_index_text_batch_with_padding(tiny_hf):
    ids, mask = left_pad([[1, 2, 3, 4, 5], [6, 7]])
    ours = get_rope_index(ids, attention_mask=mask)
    ref = hf_rope_index(tiny_hf[0], ids, mask=mask)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_rope_index_docstring_example():
    # Two text tokens, an image of 2x2 merged tokens, one text token (see get_rope_index's docstring).
    ids = np.array([[1, 2] + [IMAGE] * 4 + [3]])
    ids[0, 1] = 151652  # the second text token is the vision start
    pos, deltas = get_rope_index(ids, image_grid_thw=[(1, 4, 4)])
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]])
    assert deltas.tolist() == [[5 - 7]]
