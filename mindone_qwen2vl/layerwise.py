"""Decoding layer by layer: generate()'s decode step while a bucket has decoded few tokens, under eager attention
on the CPU backend (under sdpa, the default there, each layer of the whole step is one fused kernel and the whole
step compiles fast enough: generation.decode_kernels).

The whole-decoder step (generation.DecodeOneToken) is one graph of every layer. Its compilation grows with the
depth: 5.2-6.2 s at 28 layers on the development CPU (AMD EPYC, 2 cores), most of a fresh process's first
request. Layer by layer, two small graphs and the prompt's head do the same work:
- `DecodeInputs`: the token's embedding, rotary tables, cache mask and cache rows;
- `DecodeLayer`: one decoder layer, with that layer's weights and cache as arguments, called for each layer;
- the model's `head` step (the final norm and lm_head for any number of rows), which every prompt compiles
  anyway: a head of the bucket's own would be one more compilation, about 0.1 s at `overhead`.

The two compile in about 0.5 s together (0.16 and 0.33 s at `overhead`), and a token then costs 30 calls
instead of one. At the `overhead` shape that is 6-8 ms more a token than the whole step (33-35 ms against 27-29
in the same processes). The calls' fast path (graphs.Step.fixed_shapes) saves about 5 ms of that. More layers
a call do not close the gap (docs/benchmarks.md, twelfth session). A generation of a few tokens finishes long
before the whole step's compilation would have paid for itself. generation.Runner switches a bucket to the whole
step once the tokens asked of it make that compilation worth it.

A layer step gets its layer's cache as arguments that share the cache Parameters' memory, and writes the token's
key and value into them in place (ScatterUpdate) before attending, as the whole step writes the Parameters:
the same kernels in the same order, so the logits are bit-identical to the whole step's (the shared head step is
a dynamic-shape graph, and still gives the same bits; tests/test_generation.py checks both). Writing into a graph
argument in place is what the MindSpore 2.10 CPU backend does (tests/test_generation.py checks every token
against HF); on other backends the whole step runs (`allowed`).

An alternative that writes only Parameters (each layer returning its key and value, one last graph writing all
of them) cost 42 ms a token: that last graph's 56 inputs and writes took 7.8 ms.
"""
import mindspore as ms
from mindspore import Tensor, ops

from .attention import decode_attention
from .cache import StaticCache
from .graphs import Step
from .layers import layer_arguments


def allowed(model):
    """Whether generate() may decode layer by layer: on the CPU backend, in GRAPH_MODE (in PYNATIVE_MODE nothing
    compiles), in a single process (under tensor parallelism every rank must run the same steps, so the ranks
    keep the whole step)."""
    return (ms.get_context("device_target") == "CPU" and ms.get_context("mode") == ms.GRAPH_MODE
            and not model.tensor_parallel)


class DecodeInputs(Step):
    """(input_ids, cache_position, rope_position) [B] -> the first layer's input [B, hidden], the rotary tables,
    the mask [B, 1, 1, L] over the cache and the cache rows [B, KVH] each row writes (cache.StaticCache)."""

    fixed_shapes = True  # one bucket's shapes: graphs.Step

    def __init__(self, model, cache: StaticCache):
        super().__init__()
        object.__setattr__(self, "text", model.model)  # plain attributes: a step walks no sub-cells per call
        object.__setattr__(self, "cache", cache)

    def construct(self, input_ids, cache_position, rope_position):
        b = input_ids.shape[0]
        position_ids = ops.broadcast_to(rope_position.reshape(1, b, 1), (3, b, 1))  # M-RoPE axes move together
        cos, sin = self.text.rotary_emb(position_ids)
        cache = self.cache
        return self.text.embed_tokens(input_ids), cos, sin, cache.attention_mask(cache_position), \
            cache.rows(cache_position)


class DecodeLayer(Step):
    """One decoder layer for one token per row, with the layer's cache [B * KVH * L, D] and weights as arguments
    -> its output [B, hidden]; the token's key and value are written into the cache arguments at `rows`. It
    computes with the first layer's cells, never with their parameters, as the prompt steps do."""

    fixed_shapes = True  # one bucket's shapes: graphs.Step

    def __init__(self, layer, cache_shape):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        self.cache_shape = cache_shape  # (B, KVH, L, D)
        self.scatter = ops.ScatterUpdate()

    def construct(self, x, cos, sin, mask, rows, key_cache, value_cache, *weights):
        layer = self.layer
        q, k, v = layer.project(x, cos, sin, weights, heads_first=False)
        # depend: attend over the cache after the write, as LayerKVCache.update does.
        keys = ops.depend(key_cache, self.scatter(key_cache, rows, k.astype(key_cache.dtype)))
        values = ops.depend(value_cache, self.scatter(value_cache, rows, v.astype(value_cache.dtype)))
        out = decode_attention(q, keys.reshape(self.cache_shape), values.reshape(self.cache_shape), mask,
                               layer.attn_implementation, layer.flash_dtype, layer.flash_kernel)
        return layer.finish(x, out, weights)


class LayerwiseDecode:
    """Called as DecodeOneToken is: (input_ids, cache_position, rope_position) [B] -> float32 logits [B, V]."""

    def __init__(self, model, cache: StaticCache):
        layers = model.model.layers
        self.inputs = DecodeInputs(model, cache)
        self.layer = DecodeLayer(layers[0], cache.layers[0].shape)
        self.output = model.head  # shared with the prompt: not this bucket's graph
        self.weights = layer_arguments(model.model, layers)  # shared with the prompt
        # The caches as arguments: views of the Parameters' memory (in-place writes never give them new memory).
        self.caches = [(Tensor(c.key), Tensor(c.value)) for c in cache.layers]

    def __call__(self, input_ids, cache_position, rope_position):
        x, cos, sin, mask, rows = self.inputs(input_ids, cache_position, rope_position)
        for (key_cache, value_cache), weights in zip(self.caches, self.weights):
            x = self.layer(x, cos, sin, mask, rows, key_cache, value_cache, *weights())
        return self.output(x)

    def compiled(self):
        return self.inputs.compiled() + self.layer.compiled()
