"""Static KV cache: `batch` rows of `max_len` positions, allocated once, written in place by position.

Each layer keeps its keys and values as Parameters so that the prompt's write and the decode step (separate
graphs in GRAPH_MODE) share the same memory and write into it in place. The storage is [B * KVH * L, D], one
row per (batch row, kv head, position), written with `ScatterUpdate` on rows, the in-place (Ref) update on
every backend; attention reads it back as [B, KVH, L, D].

Every row of the batch holds one sequence from position 0, without padding, and has its own position
(`cache_position` [B]), so rows at different points of their generation can share one decode step (continuous
batching). Nothing in a cache is state of a generation: a prompt's write covers its positions, and the
attention mask, built in the graph from the positions, hides every position beyond a row's own.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .attention import MASK_MIN
from .graphs import Step, dynamic


def decode_mask(key_positions, cache_position):
    """Additive float32 mask [B, 1, 1, L] over key_positions [1, 1, L] for one query per row at cache_position [B]
    (int32): a row sees its positions up to its own. A row's sequence starts at position 0 of its cache row, with
    no padding, so what lies beyond its position is all it must not see."""
    hidden = key_positions > cache_position.reshape(-1, 1, 1)  # [B, 1, L]
    return (hidden.astype(ms.float32) * MASK_MIN).reshape(hidden.shape[0], 1, 1, hidden.shape[2])


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
        """Write key/value [B, KVH, D] at rows [B, KVH] (StaticCache.rows); return the whole cache as
        [B, KVH, L, D] (positions a row has not written are masked by the caller)."""
        # depend: read the Parameter after the write, not a value loaded before it.
        k = ops.depend(self.key, self.scatter(self.key, rows, key.astype(self.key.dtype)))
        v = ops.depend(self.value, self.scatter(self.value, rows, value.astype(self.value.dtype)))
        return k.reshape(self.shape), v.reshape(self.shape)

    def write(self, key, value, rows):
        """Write key/value at rows (any leading shape, as `update`); nothing is read back."""
        return ops.depend(rows, (self.scatter(self.key, rows, key.astype(self.key.dtype)),
                                 self.scatter(self.value, rows, value.astype(self.value.dtype))))


class LayerKVView(nn.Cell):
    """The first `length` positions of a layer's cache, for a decode step whose rows all sit below `length`:
    attention then reads `length` positions per row instead of all of them. The rows attended are the step's
    first rows: one, or all of them.

    The view gathers its storage rows from the [B * KVH * L, D] Parameter. Reshaping that Parameter to
    [B, KVH, L, D] first (as LayerKVCache.update does) copies all of it on the CPU backend: at the 2B widths
    (8 rows x 4096 positions, 33.5 MB a tensor) 5.1 ms against 0.8 ms for the gather of one row's 512 positions,
    per key and per value of every layer."""

    def __init__(self, layer: LayerKVCache, length):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "base", layer)  # not a sub-cell: the parameters stay the layer's
        self.length = length
        batch, kv_heads, max_len, head_dim = layer.shape
        self.one_row = Tensor(self.storage_rows(1, kv_heads, max_len, length))
        self.all_rows = Tensor(self.storage_rows(batch, kv_heads, max_len, length))
        self.gather = ops.Gather()

    @staticmethod
    def storage_rows(rows, kv_heads, max_len, length):
        """Storage rows of positions 0..length-1 of the first `rows` batch rows, in [rows, KVH, length] order."""
        starts = np.arange(rows * kv_heads, dtype=np.int64)[:, None] * max_len
        return (starts + np.arange(length)[None, :]).reshape(-1).astype(np.int32)

    def update(self, key, value, rows):
        written = self.base.write(key, value, rows)
        n, kv_heads, d = key.shape
        index = self.one_row if n == 1 else self.all_rows  # n is a constant of the compiled step
        shape = (n, kv_heads, self.length, d)
        k = self.gather(ops.depend(self.base.key, written), index, 0).reshape(shape)
        v = self.gather(ops.depend(self.base.value, written), index, 0).reshape(shape)
        return k, v


class CacheView(nn.Cell):
    """A StaticCache seen by a decode step over its first rows and first `length` positions (see
    StaticCache.view): the same storage, a smaller step."""

    def __init__(self, cache, length):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "cache", cache)
        self.length = length
        self.layers = nn.CellList([LayerKVView(layer, length) for layer in cache.layers])
        self.key_positions = Tensor(np.arange(length, dtype=np.int32).reshape(1, 1, length))
        self.slice = ops.Slice()

    def rows(self, cache_position):
        b = cache_position.shape[0]
        base = self.cache.row_base if b == self.cache.batch else self.slice(self.cache.row_base, (0, 0), (b, -1))
        return base + cache_position.reshape(-1, 1)

    def attention_mask(self, cache_position):
        return decode_mask(self.key_positions, cache_position)


class StaticCache(nn.Cell):
    """The KV caches of every decoder layer plus the attention mask over them."""

    def __init__(self, text_config, batch, max_len, dtype=ms.float32, kv_heads=None, input_dtype=None):
        """dtype: what the cache stores (precision.PrecisionPolicy.cache_dtype); input_dtype: what the prompt's
        keys and values arrive in (default: dtype). kv_heads: the KV heads the decoder holds in this process;
        under tensor parallelism (parallel.py) a rank holds fewer than the config's num_key_value_heads."""
        super().__init__(auto_prefix=False)
        self.batch = batch
        self.max_len = max_len
        self.kv_heads = kv_heads or text_config.num_key_value_heads
        self.input_dtype = input_dtype or dtype
        head_dim = text_config.head_dim
        self.layers = nn.CellList([
            LayerKVCache(batch, self.kv_heads, max_len, head_dim, dtype, f"kv_cache.{i}")
            for i in range(text_config.num_hidden_layers)
        ])
        for i, layer in enumerate(self.layers):  # CellList prefixed them with the index; keep our names
            layer.key.name, layer.value.name = f"kv_cache.{i}.key", f"kv_cache.{i}.value"
        self.key_positions = Tensor(np.arange(max_len, dtype=np.int32).reshape(1, 1, max_len))
        # Row of position 0 for each (batch row, kv head), laid out [B, KVH] like a step's keys [B, KVH, D].
        self.row_base = Tensor(self.base_rows())
        object.__setattr__(self, "write_prompt", WritePrompt(self))  # a step over this cache, not a part of it

    def base_rows(self):
        return np.arange(self.batch * self.kv_heads, dtype=np.int32).reshape(self.batch, self.kv_heads) * self.max_len

    def prompt_rows(self, slot, length):
        """Storage rows [KVH, length] of positions 0..length-1 of batch row `slot` (host)."""
        return (self.base_rows()[slot][:, None] + np.arange(length, dtype=np.int32)[None, :]).astype(np.int32)

    def rows(self, cache_position):
        """Storage rows [B, KVH] of each row's position cache_position [B], the same for every layer (computed
        once per step, not per layer)."""
        return self.row_base + cache_position.reshape(-1, 1)

    def attention_mask(self, cache_position):
        return decode_mask(self.key_positions, cache_position)

    def view(self, length):
        """This cache as a decode step over its first rows (as many as the step's inputs) and its first `length`
        positions sees it; `length` = max_len: all of it."""
        if not 1 <= length <= self.max_len:
            raise ValueError(f"a view of {length} positions of a {self.max_len}-position cache")
        return CacheView(self, length)

    def nbytes(self):
        return sum(p.nbytes for p in self.get_parameters())


class WritePrompt(Step):
    """Writes a prompt's keys and values (Qwen2VLTextModel.prompt, [KVH, S, D] per layer) to the rows `rows`
    [KVH, S] (StaticCache.prompt_rows): one graph for every layer and any prompt length."""

    def __init__(self, cache: StaticCache):
        super().__init__()
        object.__setattr__(self, "cache", cache)  # not a sub-cell: the cache holds this step

    def specs(self):
        kv, d = self.cache.kv_heads, self.cache.layers[0].shape[3]
        entry = dynamic((kv, None, d), self.cache.input_dtype)
        return (dynamic((kv, None), ms.int32),) + (entry,) * (2 * len(self.cache.layers))

    def construct(self, rows, *kv):
        done = rows
        for i, layer in enumerate(self.cache.layers):
            done = ops.depend(done, layer.write(kv[2 * i], kv[2 * i + 1], rows))
        return done
