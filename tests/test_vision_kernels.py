"""The CPU backend's vision block (csrc/vision.cc, Qwen2VisionTransformer.block_kernels): each block of the vision
tower as one operator, against the eager tower of the same checkpoint, for Qwen2-VL (frames) and Qwen2.5-VL
(windows and frames); where it applies; bad segment bounds."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from tiny import hf_config_2_5, hf_model, random_pixels, save_checkpoint

# One image, a video of three frames, two images of different sizes; windows cut at the edges (Qwen2.5-VL).
GRIDS = [[(1, 4, 6)], [(3, 6, 4)], [(1, 10, 14), (1, 8, 8)]]


@pytest.fixture(scope="module")
def pair25(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint loaded twice: sdpa (the CPU's default) and eager."""
    from mindone_qwen2vl import Qwen2_5_VLForConditionalGeneration

    folder = str(save_checkpoint(hf_model(hf_config_2_5(), seed=5), tmp_path_factory.mktemp("tiny_qwen2_5_vl")))
    load = Qwen2_5_VLForConditionalGeneration.from_pretrained
    return load(folder, progress=False), load(folder, progress=False, attn_implementation="eager")


def tower(model, grid):
    return model.visual(random_pixels(grid, seed=len(grid)), np.array(grid)).asnumpy()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fused_blocks_match_the_eager_tower(tiny_ours, tiny_eager, pair25, ms_mode, family):
    """Merged features within 1e-5 of the eager tower's (relative to their max) for every layout, through one
    compiled graph in graph mode."""
    ours, eager = (tiny_ours, tiny_eager) if family == "qwen2_vl" else pair25
    assert ours.visual.block_kernels() is not None
    step = ours.visual.steps["block_fused"]
    before = step.compiled()
    for grid in GRIDS:
        got, want = tower(ours, grid), tower(eager, grid)
        assert got.shape == want.shape
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, grid
    if ms_mode == "graph":
        assert step.compiled() == max(before, 1)


def test_where_the_fused_block_applies(tiny_ours, tiny_eager):
    """Only under sdpa (the CPU backend) in float32."""
    assert tiny_ours.visual.block_kernels() is not None
    assert tiny_eager.visual.block_kernels() is None


@pytest.mark.parametrize("bounds", [[0, 3], [0, 5, 4, 6], [1, 6], "short bias"])
def test_the_block_operator_refuses_bad_bounds(tiny_ours, bounds):
    """Segment bounds that do not cover the rows exactly, in order, or a bias shorter than its projection, fail in
    MindSpore with an error, never read out of bounds."""
    vis = tiny_ours.visual
    block = vis.blocks[0]
    n, e, d = 6, block.attn.proj.out_features, block.head_dim
    x = Tensor(np.ones((n, e), np.float32))
    table = Tensor(np.ones((n, 3, 1, d), np.float32))
    kernels = vis.block_kernels()
    kind = Tensor(np.array([0], np.int32))
    good = kernels.vision_block(x, table, table, Tensor(np.array([0, 2, 6], np.int32)), kind, *block.weights())
    assert good.shape == (n, e)
    weights = list(block.weights())
    if bounds == "short bias":
        bounds, weights[3] = [0, 6], Tensor(weights[3].asnumpy()[:-1])  # qkv.bias
    with pytest.raises(RuntimeError):
        kernels.vision_block(x, table, table, Tensor(np.array(bounds, np.int32)), kind, *weights).asnumpy()
