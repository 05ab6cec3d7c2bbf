"""The static KV cache: in-place writes by position, the mask over the bucket."""
import numpy as np
from mindspore import Tensor, nn

from mindone_qwen2vl.cache import StaticCache, bucket_length
from mindone_qwen2vl.config import Qwen2VLTextConfig
from mindone_qwen2vl.modeling_qwen2_vl import causal_mask

CONFIG = Qwen2VLTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           intermediate_size=64, vocab_size=100)  # head_dim 8


class Write(nn.Cell):
    """Writes layer 0 and returns what attention would read, as a graph in GRAPH_MODE."""

    def __init__(self, cache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, k, v, cache_position):
        return self.cache.layers[0].update(k, v, self.cache.rows(cache_position))


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]
    assert bucket_length(65, 64) == 128


def test_update_writes_positions_in_place(ms_mode):
    cache = StaticCache(CONFIG, batch=2, max_len=16)
    param = cache.layers[0].key
    write = Write(cache)
    rng = np.random.default_rng(0)
    prompt_k, prompt_v = (rng.standard_normal((2, 2, 5, 8)).astype(np.float32) for _ in range(2))
    # Keys arrive as [B, S, KVH, D] (the projection's layout) and are read back as [B, KVH, L, D].
    as_written = lambda x: Tensor(x.transpose(0, 2, 1, 3).copy())  # noqa: E731
    k, v = write(as_written(prompt_k), as_written(prompt_v), Tensor(np.arange(5, dtype=np.int32)))
    np.testing.assert_array_equal(v.asnumpy()[:, :, :5], prompt_v)
    step_k = rng.standard_normal((2, 2, 1, 8)).astype(np.float32)
    k, v = write(as_written(step_k), as_written(step_k), Tensor(np.array([5], np.int32)))
    expect = np.zeros((2, 2, 16, 8), np.float32)
    expect[:, :, :5], expect[:, :, 5:6] = prompt_k, step_k
    assert k.shape == (2, 2, 16, 8)
    np.testing.assert_array_equal(k.asnumpy(), expect)
    assert cache.layers[0].key is param  # the same Parameter, written in place
    np.testing.assert_array_equal(param.asnumpy().reshape(2, 2, 16, 8), expect)
    assert not cache.layers[1].key.asnumpy().any()  # other layers untouched


def test_mask_over_the_bucket_is_the_causal_padding_mask(ms_mode):
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = StaticCache(CONFIG, batch=2, max_len=8)
    key_mask = np.ones((2, 8), np.int32)
    key_mask[:, :5] = mask
    full = np.concatenate([mask, np.ones((2, 3), np.int64)], 1)
    prefill = cache.attention_mask(Tensor(key_mask), Tensor(np.arange(5, dtype=np.int32))).asnumpy()
    np.testing.assert_array_equal(prefill, causal_mask(full, 5, 8))
    step = cache.attention_mask(Tensor(key_mask), Tensor(np.array([6], np.int32))).asnumpy()
    np.testing.assert_array_equal(step, causal_mask(full, 1, 8, past_len=6))
