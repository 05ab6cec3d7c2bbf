"""The vision tower alone against HF's, and the host-side layout it relies on."""
import numpy as np
import pytest
import torch

from mindone_qwen2vl.modeling_vision import vision_plan
from tiny import random_pixels, rel_err

GRIDS = {
    "one_image": [(1, 4, 6)],
    "images_of_different_sizes": [(1, 4, 6), (1, 8, 4), (1, 2, 2)],
    "video_several_temporal_patches": [(3, 4, 4)],
    "image_and_video": [(1, 6, 4), (2, 4, 8)],
}


def hf_visual(hf_model, pixels, grid):
    with torch.no_grad():
        return hf_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).numpy()


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_vision_tower_matches_hf(tiny_hf, tiny_ours, ms_mode, case):
    grid = np.array(GRIDS[case])
    pixels = random_pixels(grid, seed=1)
    ours = tiny_ours.get_vision_features(pixels, grid).asnumpy()
    ref = hf_visual(tiny_hf[0], pixels, grid)
    assert ours.shape == ref.shape == (grid.prod(-1).sum() // 4, 64)
    assert rel_err(ours, ref) < 1e-5


def test_vision_rotary_frequencies_equal_hf(tiny_hf, tiny_ours):
    ref = tiny_hf[0].model.visual.rotary_pos_emb.inv_freq.numpy()
    np.testing.assert_array_equal(tiny_ours.visual.rotary_pos_emb.inv_freq.asnumpy(), ref)


def test_plan_orders_positions_by_merge_window():
    plan = vision_plan([(1, 2, 4)])
    # 2x4 patches in 2x2 windows: window (0,0) then window (0,1), each row-major inside.
    assert plan.rot_pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_plan_groups_frames_of_equal_length():
    plan = vision_plan([(2, 2, 2), (1, 4, 2)])
    # Frames of 4, 4 and 8 patches: attention never crosses a frame, and frames of one length form one batch
    # ([F, L] patch indices), so nothing is padded or masked.
    assert [g.tolist() for g in plan.groups] == [[[0, 1, 2, 3], [4, 5, 6, 7]], [list(range(8, 16))]]
    assert plan.blocks == [[(0, 4)], [(0, 8)]]
    assert plan.unpad is None  # the groups' outputs are in patch order already


def test_plan_takes_grouped_outputs_back_to_patch_order():
    plan = vision_plan([(1, 4, 2), (2, 2, 2)])  # frames of 8, 4, 4: the 4s are grouped first
    assert [g.shape for g in plan.groups] == [(2, 4), (1, 8)]
    grouped = np.concatenate([g.reshape(-1) for g in plan.groups])
    assert grouped[plan.unpad].tolist() == list(range(16))


def test_plan_needs_no_padding_for_equal_frames():
    plan = vision_plan([(4, 4, 4)])
    assert len(plan.groups) == 1 and plan.groups[0].shape == (4, 16)
    assert plan.unpad is None


def test_plan_rejects_odd_grid():
    with pytest.raises(ValueError, match="multiples of 2"):
        vision_plan([(1, 3, 4)])


def test_pixels_that_do_not_match_the_grid(tiny_ours):
    with pytest.raises(ValueError, match=r"pixel_values must be \[24, \d+\] for grid_thw \[\[1, 4, 6\]\]"):
        tiny_ours.get_vision_features(random_pixels([(1, 4, 4)]), [(1, 4, 6)])


def test_the_patch_embedding_in_calls_is_exact(tiny_hf, tiny_ours, ms_mode, monkeypatch):
    """Patches embedded EMBED_ROWS at a time (the last call shorter) give the one-call features (to rounding: a
    matmul of fewer rows may sum in another order), from numpy pixels and from a Tensor."""
    import mindspore as ms

    from mindone_qwen2vl import modeling_vision

    grid = np.array([(1, 8, 12), (2, 4, 4)])
    pixels = random_pixels(grid, seed=7)
    whole = tiny_ours.get_vision_features(pixels, grid).asnumpy()
    calls = []
    step = tiny_ours.visual.steps["embed"]
    monkeypatch.setattr(modeling_vision, "EMBED_ROWS", 40)
    monkeypatch.setattr(tiny_ours.visual, "steps", {**tiny_ours.visual.steps,
                                                    "embed": lambda p, r: calls.append(len(r)) or step(p, r)})
    for given in (pixels, ms.Tensor(pixels)):
        assert rel_err(tiny_ours.get_vision_features(given, grid).asnumpy(), whole) < 1e-6
    assert calls == [40, 40, 40, 8] * 2  # 128 patches
    assert rel_err(whole, hf_visual(tiny_hf[0], pixels, grid)) < 1e-5


def test_query_blocks_are_exact(tiny_hf, tiny_eager, ms_mode, monkeypatch):
    """Blocked eager attention (used for big images) equals the one-block result and HF."""
    from mindone_qwen2vl import attention

    grid = np.array([(1, 8, 12), (1, 4, 4)])
    pixels = random_pixels(grid, seed=9)
    whole = tiny_eager.get_vision_features(pixels, grid).asnumpy()
    # The 96-patch frame: 4 heads x 96 keys x 4 bytes per query row, a budget of 10 rows forces 10 blocks
    # (the last of 6); the 16-patch frame still fits in one.
    monkeypatch.setattr(attention, "SCORES_BUDGET", 4 * 96 * 4 * 10)
    plan = tiny_eager.visual.plan(grid)
    assert [g.shape for g in plan.groups] == [(1, 16), (1, 96)]
    assert plan.blocks[0] == [(0, 16)]
    assert plan.blocks[1] == [(a, min(a + 10, 96)) for a in range(0, 96, 10)]
    assert plan.unpad is not None
    blocked = tiny_eager.get_vision_features(pixels, grid).asnumpy()
    assert rel_err(blocked, whole) < 1e-6
    assert rel_err(blocked, hf_visual(tiny_hf[0], pixels, grid)) < 1e-5
