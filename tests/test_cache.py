"""The static KV cache: rows of one sequence each from position 0, in-place writes by position, the mask per row."""
import numpy as np
from mindspore import Tensor, nn

from mindone_qwen2vl.attention import MASK_MIN
from mindone_qwen2vl.cache import StaticCache
from mindone_qwen2vl.config import Qwen2VLTextConfig
from mindone_qwen2vl.generation import batch_rows, cache_length
from mindone_qwen2vl.inputs import causal_mask

CONFIG = Qwen2VLTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           intermediate_size=64, vocab_size=100)  # head_dim 8


class Update(nn.Cell):
    """One decode step's write to layer 0 and what attention reads back, as a graph in GRAPH_MODE."""

    def __init__(self, cache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, k, v, cache_position):
        return self.cache.layers[0].update(k, v, self.cache.rows(cache_position))


class Mask(nn.Cell):
    def __init__(self, cache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, cache_position):
        return self.cache.attention_mask(cache_position)


def test_bucket_sizes_are_powers_of_two():
    assert [cache_length(n) for n in (1, 256, 257, 600, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]
    assert [batch_rows(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 8]


def test_prompt_rows_and_step_rows_address_the_storage():
    cache = StaticCache(CONFIG, batch=2, max_len=16)
    # Storage is [B * KVH * L, D]: row (b, h, position) is (b * KVH + h) * L + position.
    assert cache.prompt_rows(1, 3).tolist() == [[32, 33, 34], [48, 49, 50]]
    rows = cache.rows(Tensor(np.array([3, 5], np.int32))).asnumpy()
    assert rows.tolist() == [[3, 19], [37, 53]]  # [B, KVH], like a decode step's keys [B, KVH, D]


def test_writes_positions_in_place(ms_mode):
    cache = StaticCache(CONFIG, batch=2, max_len=16)
    param = cache.layers[0].key
    rng = np.random.default_rng(0)
    # A prompt of 5 positions in batch row 1, every layer ([KVH, S, D] per layer, as the prompt steps give them).
    prompt = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(4)]
    cache.write_prompt(Tensor(cache.prompt_rows(1, 5)), *[Tensor(x) for x in prompt])
    # Then one step: row 0 writes its position 3, row 1 its position 5 (keys [B, KVH, D]).
    step_k, step_v = (rng.standard_normal((2, 2, 8)).astype(np.float32) for _ in range(2))
    k, v = Update(cache)(Tensor(step_k), Tensor(step_v), Tensor(np.array([3, 5], np.int32)))
    expect_k = np.zeros((2, 2, 16, 8), np.float32)
    expect_v = np.zeros((2, 2, 16, 8), np.float32)
    expect_k[1, :, :5], expect_v[1, :, :5] = prompt[0], prompt[1]
    expect_k[0, :, 3], expect_k[1, :, 5] = step_k[0], step_k[1]
    expect_v[0, :, 3], expect_v[1, :, 5] = step_v[0], step_v[1]
    assert k.shape == v.shape == (2, 2, 16, 8)  # read back as [B, KVH, L, D]
    np.testing.assert_array_equal(k.asnumpy(), expect_k)
    np.testing.assert_array_equal(v.asnumpy(), expect_v)
    assert cache.layers[0].key is param  # the same Parameter, written in place
    np.testing.assert_array_equal(param.asnumpy().reshape(2, 2, 16, 8), expect_k)
    # Layer 1 got the prompt's write only.
    expect_k1 = np.zeros((2, 2, 16, 8), np.float32)
    expect_k1[1, :, :5] = prompt[2]
    np.testing.assert_array_equal(cache.layers[1].key.asnumpy().reshape(2, 2, 16, 8), expect_k1)


def test_mask_hides_what_lies_beyond_each_rows_position(ms_mode):
    cache = StaticCache(CONFIG, batch=2, max_len=8)
    positions = np.array([2, 6], np.int32)
    mask = Mask(cache)(Tensor(positions)).asnumpy()
    assert mask.shape == (2, 1, 1, 8)
    # Each row: the causal mask of one query at its own position over a sequence without padding.
    for b, position in enumerate(positions):
        np.testing.assert_array_equal(mask[b], causal_mask(np.ones((1, 8), np.int64), 1, 8, past_len=position)[0])
    assert (mask[0, 0, 0, 3:] == MASK_MIN).all() and (mask[0, 0, 0, :3] == 0).all()
