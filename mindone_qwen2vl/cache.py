"""Static KV cache: allocated once per generation shape (batch, bucket), written in place by position.

Each layer keeps its keys and values as Parameters so that prefill and the decode step (two graphs in
GRAPH_MODE) share the same device memory and write into it in place. The storage is [B * KVH * L, D], one row
per (batch, kv head, position), written with `ScatterUpdate` on rows, the classic in-place (Ref) update on
every backend; attention reads it back as [B, KVH, L, D]. Measured on the MindSpore 2.10 CPU backend (28
layers, L=4096): the row write itself does not grow with L, but the read back as [B, KVH, L, D] costs one copy
of the cache; ScatterNdUpdate, TensorScatterUpdate + Assign and slice assignment on a [B, KVH, L, D]
Parameter each cost about the same extra pass (inside the kernel), i.e. about what attention's own read of
the cache costs. On CPU that is small next to reading the weights once per token.

Nothing in a cache is state of a generation: prefill rewrites the prompt's rows, and the attention mask,
built in the graph from the call's attention mask and the current position, hides every row this call has
not written. A cache can therefore be reused by the next generation of the same (batch, bucket).
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

MASK_MIN = float(np.finfo(np.float32).min)


def bucket_length(needed, bucket=128):
    """Cache length for `needed` positions: rounded up so that nearby prompt lengths share one decode graph."""
    return -(-int(needed) // bucket) * bucket


class LayerKVCache(nn.Cell):
    """Keys and values of one decoder layer for `batch` rows of up to `max_len` positions."""

    def __init__(self, batch, kv_heads, max_len, head_dim, dtype, name):
        # No prefix: the Parameters keep the names given here whatever cell holds the cache.
        super().__init__(auto_prefix=False)
        self.shape = (batch, kv_heads, max_len, head_dim)
        rows = batch * kv_heads * max_len
        self.key = Parameter(Tensor(np.zeros((rows, head_dim)), dtype), name=f"{name}.key", requires_grad=False)
        self.value = Parameter(Tensor(np.zeros((rows, head_dim)), dtype), name=f"{name}.value",
                               requires_grad=False)
        self.scatter = ops.ScatterUpdate()

    def update(self, key, value, rows):
        """Write key/value [B, S, KVH, D] at rows [B, S, KVH] (StaticCache.rows); return the whole cache as
        [B, KVH, L, D] (rows not written by this generation are masked by the caller)."""
        # depend: read the Parameter after the write, not a value loaded before it.
        k = ops.depend(self.key, self.scatter(self.key, rows, key.astype(self.key.dtype)))
        v = ops.depend(self.value, self.scatter(self.value, rows, value.astype(self.value.dtype)))
        return k.reshape(self.shape), v.reshape(self.shape)

    def write(self, key, value, rows):
        """Write key/value [B, S, KVH, D] at rows [B, S, KVH]; nothing is read back."""
        return ops.depend(rows, (self.scatter(self.key, rows, key.astype(self.key.dtype)),
                                 self.scatter(self.value, rows, value.astype(self.value.dtype))))


class StaticCache(nn.Cell):
    """The KV caches of every decoder layer plus the attention mask over them.

    `layers` and `rows(cache_position)` are what `Qwen2VLTextModel.construct(..., caches=, cache_rows=)` takes.
    """

    def __init__(self, text_config, batch, max_len, dtype=ms.float32, kv_heads=None):
        """kv_heads: the KV heads the decoder holds in this process; under tensor parallelism (parallel.py)
        a rank holds fewer than the config's num_key_value_heads."""
        super().__init__(auto_prefix=False)
        self.batch = batch
        self.max_len = max_len
        kv_heads, head_dim = kv_heads or text_config.num_key_value_heads, text_config.head_dim
        self.layers = nn.CellList([
            LayerKVCache(batch, kv_heads, max_len, head_dim, dtype, f"kv_cache.{i}")
            for i in range(text_config.num_hidden_layers)
        ])
        for i, layer in enumerate(self.layers):  # CellList prefixed them with the index; keep our names
            layer.key.name, layer.value.name = f"kv_cache.{i}.key", f"kv_cache.{i}.value"
        self.key_positions = Tensor(np.arange(max_len, dtype=np.int32).reshape(1, 1, max_len))
        # Row of position 0 for each (batch, kv head), laid out [B, 1, KVH] like the keys [B, S, KVH, D].
        base = np.arange(batch * kv_heads, dtype=np.int32).reshape(batch, 1, kv_heads) * max_len
        self.row_base = Tensor(base)

    def rows(self, cache_position):
        """Storage rows [B, S, KVH] of positions cache_position [S], the same for every layer (computed once
        per step, not per layer)."""
        return self.row_base + cache_position.reshape(1, -1, 1)

    def attention_mask(self, key_mask, cache_position):
        """Additive float32 mask [B, 1, S, L] for queries at cache_position [S] (int32).

        key_mask [B, L] int32 is 1 where the cache holds a real token (prompt tokens that are not padding, and
        every generated position); a query sees those keys at positions up to its own.
        """
        s = cache_position.shape[0]
        causal = self.key_positions <= cache_position.reshape(1, s, 1)  # [1, S, L]
        allowed = ops.logical_and(causal, key_mask.reshape(self.batch, 1, self.max_len) > 0)
        return (ops.logical_not(allowed).astype(ms.float32) * MASK_MIN).reshape(self.batch, 1, s, self.max_len)

    def nbytes(self):
        return sum(p.nbytes for p in self.get_parameters())


class WritePrompt(nn.Cell):
    """Writes a prompt's keys and values, computed without the cache (Qwen2VLTextModel.prompt_layers), to a
    StaticCache at cache_position [S]: one graph for every layer."""

    def __init__(self, cache: StaticCache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, cache_position, *kv):
        rows = self.cache.rows(cache_position)
        done = rows
        for i, layer in enumerate(self.cache.layers):
            done = ops.depend(done, layer.write(kv[2 * i], kv[2 * i + 1], rows))
        return done
