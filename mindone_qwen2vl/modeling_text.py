"""Qwen2 decoder with multimodal rotary embedding (M-RoPE): `model.*` of the HF checkpoint."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import decoder_attention
from .config import Qwen2VLTextConfig
from .layers import Embedding, Linear, PackedLinear, RMSNorm, as_arguments, rotate_half_matrix, split
from .precision import PrecisionPolicy


# Above this many bytes of per-token rotation matrices (Qwen2VLRotaryEmbedding), rotate with tables instead:
# a decode step of the 2B model at batch 1 needs 1 MB, read once per layer.
ROTATION_MATRIX_BYTES = 4 * 2 ** 20


class Qwen2VLRotaryEmbedding(nn.Cell):
    """Rotary embedding from 3-axis positions [3, B, S] for every head of the packed q/k/v projection: tables
    (cos, sin) [B*S, heads + 2 * kv heads, head_dim], or for a few tokens (rotation matrix,) of
    [B*S, heads + 2 * kv heads, head_dim, head_dim].

    M-RoPE gives the frequencies in `mrope_section` to the temporal, height and width positions in turn
    (e.g. 16/24/24 of the 64 frequencies of the 2B model). Selecting each frequency's position first and then
    multiplying equals taking the per-axis tables and slicing them, with a third of the work.

    The per-head rows let each layer rotate q and k and pass v in one pass over its qkv output: query rows
    carry the attention scale (applied once per step here rather than to every layer's scores), key rows are
    the plain tables, value rows are cos 1 and sin 0 (x * 1 + y * 0 == x exactly).
    """

    def __init__(self, config: Qwen2VLTextConfig):
        super().__init__()
        dim = config.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
        axis = np.repeat(np.arange(3), config.mrope_section)
        self.head_dim = dim
        self.inv_freq = Tensor(inv_freq)
        self.eye = Tensor(np.eye(dim, dtype=np.float32))
        self.rotate_half = Tensor(rotate_half_matrix(dim))
        self.axis_onehot = Tensor((np.arange(3)[:, None] == axis[None, :]).astype(np.float32)[:, None, None, :])
        self.set_heads(config.num_attention_heads, config.num_key_value_heads)

    def set_heads(self, heads, kv_heads):
        """The head counts of the qkv projection this process holds (fewer on a tensor-parallel rank)."""
        scale = np.float32(self.head_dim) ** np.float32(-0.5)
        factor = np.concatenate([np.full(heads, scale), np.ones(kv_heads), np.zeros(kv_heads)]).astype(np.float32)
        self.factor = Tensor(factor.reshape(1, -1, 1))
        self.value_cos = Tensor((np.arange(heads + 2 * kv_heads) >= heads + kv_heads).astype(np.float32)
                                .reshape(1, -1, 1))

    def construct(self, position_ids):
        pos = position_ids.astype(ms.float32).expand_dims(-1)  # [3, B, S, 1]
        # Exactly one of the three terms is non-zero for each frequency, so the sum is exact.
        freqs = (pos * self.axis_onehot).sum(0) * self.inv_freq  # [B, S, dim/2]
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, self.head_dim)
        cos, sin = ops.cos(emb) * self.factor + self.value_cos, ops.sin(emb) * self.factor
        if cos.shape[0] * cos.shape[1] * self.head_dim * self.head_dim * 4 > ROTATION_MATRIX_BYTES:
            return cos, sin
        # Few tokens (a decode step): one [D, D] matrix per token and head, so that each layer rotates with one
        # batched matmul instead of four kernels. x @ M == x * cos + rotate_half(x) * sin, M = diag(cos) + R sin.
        return (self.eye * cos.expand_dims(2) + self.rotate_half * sin.expand_dims(2),)


class Qwen2MLP(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, dtype=ms.float32):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = PackedLinear(config.hidden_size, [("gate_proj", (0, inter), inter),
                                                              ("up_proj", (0, inter), inter)], bias=False, dtype=dtype)
        self.down_proj = Linear(inter, config.hidden_size, bias=False, dtype=dtype)

    def construct(self, x):
        return self.compute(x, self.gate_up_proj.weight, self.down_proj.weight)

    def compute(self, x, gate_up_weight, down_weight):
        gate, up = split(self.gate_up_proj.compute(x, gate_up_weight), self.gate_up_proj.sizes, -1)
        return self.down_proj.compute(ops.silu(gate) * up, down_weight)


def qkv_parts(heads, kv_heads, head_dim, q_span=None, kv_span=None):
    """PackedLinear parts of q/k/v: the whole projections, or a tensor-parallel rank's spans of their rows."""
    q_whole, kv_whole = heads * head_dim, kv_heads * head_dim
    q_span, kv_span = q_span or (0, q_whole), kv_span or (0, kv_whole)
    return [("q_proj", q_span, q_whole), ("k_proj", kv_span, kv_whole), ("v_proj", kv_span, kv_whole)]


class Qwen2VLAttention(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        dtype = policy.compute_dtype
        h = config.hidden_size
        self.qkv_proj = PackedLinear(h, qkv_parts(self.num_heads, self.num_kv_heads, self.head_dim), bias=True,
                                     dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False, dtype=dtype)
        self.rotate_half = Tensor(rotate_half_matrix(self.head_dim))
        self.matmul = ops.MatMul()
        self.bmm = ops.BatchMatMul()

    def construct(self, x, rope, mask, cache=None, cache_rows=None):
        """x [B*S, hidden]; rope: (cos, sin) or (rotation matrices,) of Qwen2VLRotaryEmbedding; mask additive
        [B, 1, S, L]. cache: None (L = S), or a cache.LayerKVCache that stores this call's keys/values at
        cache_rows (cache.StaticCache.rows) and returns the whole cache to attend over (L = its length)."""
        rope_b = rope[1] if len(rope) == 2 else None
        return self.compute(x, rope[0], rope_b, mask, cache, cache_rows, self.qkv_proj.weight, self.qkv_proj.bias,
                            self.o_proj.weight)[0]

    def compute(self, x, rope_a, rope_b, mask, cache, cache_rows, qkv_weight, qkv_bias, o_weight, keep=None):
        """`construct` with the weights as arguments and rope as (cos, sin) or (matrices, None); returns
        (output [B*S, hidden], this call's keys and values [B, S, KVH, D]). keep: only the last `keep` query
        positions attend (output [B*keep, hidden]); keys and values are still every position's."""
        b, s = mask.shape[0], mask.shape[2]
        heads, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # Rotary in float32 whatever the compute dtype (the angles lose bits in fp16), q, k and v in one pass.
        qkv = self.qkv_proj.compute(x, qkv_weight, qkv_bias).astype(ms.float32)
        n = heads + 2 * kv
        if rope_b is None:
            qkv = self.bmm(qkv.reshape(-1, n, 1, d), rope_a).reshape(-1, n, d)
        else:
            rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(-1, n, d)
            qkv = qkv.reshape(-1, n, d) * rope_a + rotated * rope_b
        q, k, v = split(qkv.astype(x.dtype), (heads, kv, kv), 1)
        k, v = k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)
        if cache is not None:
            keys, values = cache.update(k, v, cache_rows)
        else:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q = q.reshape(b, s, heads, d)
        if keep is not None:
            q, mask = last_positions(q, keep, 1), last_positions(mask, keep, 2)
        out = decoder_attention(q, keys, values, mask, self.attn_implementation, self.flash_dtype)
        return self.o_proj.compute(out, o_weight), k, v


class Qwen2VLDecoderLayer(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.self_attn = Qwen2VLAttention(config, policy)
        self.mlp = Qwen2MLP(config, policy.compute_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def construct(self, x, rope, mask, cache=None, cache_rows=None):
        rope_b = rope[1] if len(rope) == 2 else None
        return self.compute(x, rope[0], rope_b, mask, cache, cache_rows, *self.parameters_in_order())[0]

    def parameters_in_order(self):
        return (self.input_layernorm.weight, self.self_attn.qkv_proj.weight, self.self_attn.qkv_proj.bias,
                self.self_attn.o_proj.weight, self.post_attention_layernorm.weight, self.mlp.gate_up_proj.weight,
                self.mlp.down_proj.weight)

    def weights(self):
        """The layer's tensors in `compute`'s argument order, as values (plain tensors, not Parameters): what
        DecoderLayerStep takes, so that one compiled graph serves every layer."""
        return as_arguments(self.parameters_in_order())

    def compute(self, x, rope_a, rope_b, mask, cache, cache_rows, input_norm, qkv_weight, qkv_bias, o_weight,
                post_norm, gate_up_weight, down_weight, keep=None):
        """The layer with its weights as arguments -> (x [B*S, hidden], keys and values [B, S, KVH, D]).
        keep: the output holds only the last `keep` positions, [B*keep, hidden] (the last layer of a prompt
        whose logits are wanted there only); keys and values are every position's, for the cache."""
        attn, k, v = self.self_attn.compute(self.input_layernorm.compute(x, input_norm), rope_a, rope_b, mask, cache,
                                            cache_rows, qkv_weight, qkv_bias, o_weight, keep)
        if keep is not None:
            b, s = mask.shape[0], mask.shape[2]
            x = last_positions(x.reshape(b, s, -1), keep, 1).reshape(b * keep, -1)
        x = x + attn
        return x + self.mlp.compute(self.post_attention_layernorm.compute(x, post_norm), gate_up_weight,
                                    down_weight), k, v


class DecoderLayerStep(nn.Cell):
    """One decoder layer with its weights as arguments: one graph, compiled once per prompt shape, runs every
    layer of a prompt (Qwen2VLTextModel.prompt_layers).

    In GRAPH_MODE each compiled graph keeps its own workspace for as long as it lives, and a graph of all the
    layers holds every layer's: a 2000-token prompt at the 2B widths grew RSS by about 1 GB per layer, in
    forward() and again in generate()'s prefill. The step holds one layer's, shared by both.
    It computes with the first layer's cells (their head counts, attention backend and, under tensor
    parallelism, their all-reduce), never with their parameters.
    """

    def __init__(self, layer: Qwen2VLDecoderLayer):
        # No prefix: holding the layer here must not rename its parameters.
        super().__init__(auto_prefix=False)
        self.layer = layer

    def construct(self, x, rope_a, rope_b, mask, input_norm, qkv_weight, qkv_bias, o_weight, post_norm,
                  gate_up_weight, down_weight, keep=None):
        # keep (a Python int or None) is a constant of the graph: a prompt's last layer compiles its own.
        return self.layer.compute(x, rope_a, rope_b, mask, None, None, input_norm, qkv_weight, qkv_bias, o_weight,
                                  post_norm, gate_up_weight, down_weight, keep)


class Qwen2VLTextModel(nn.Cell):
    """Embedding, decoder layers and final norm. `construct` takes embeddings (vision already merged).

    Between the layers the hidden states are [B*S, hidden]: every projection is then a plain 2-D matmul.
    """

    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=policy.compute_dtype)
        self.layers = nn.CellList([Qwen2VLDecoderLayer(config, policy) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2VLRotaryEmbedding(config)
        self.layer_step = DecoderLayerStep(self.layers[0])

    def construct(self, inputs_embeds, position_ids, mask, caches=None, cache_rows=None):
        """inputs_embeds [B, S, hidden], position_ids [3, B, S], mask additive [B, 1, S, L] -> [B, S, hidden].
        caches: None, or the per-layer KV caches (cache.StaticCache.layers) written at cache_rows
        (cache.StaticCache.rows of the call's positions)."""
        b, s, h = inputs_embeds.shape
        rope = self.rotary_emb(position_ids)
        x = inputs_embeds.reshape(b * s, h)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if caches is None else caches[i], cache_rows)
        return self.norm(x).reshape(b, s, h)

    def prompt_layers(self, inputs_embeds, position_ids, mask, keep_kv=False, keep_last=0):
        """`construct` without a cache, as separate graphs in GRAPH_MODE: the rotary tables, each layer (one
        shared compiled DecoderLayerStep), the final norm. -> (hidden [B, S, hidden], keys and values)

        For whole prompts (forward, generate's prefill): memory then holds one layer's workspace, not one per
        layer. keep_kv: also return every layer's keys and values [B, S, KVH, D] (k0, v0, k1, v1, ...), to be
        written to a cache; otherwise (). keep_last=n (0 < n < S): hidden is only the last n positions,
        [B, n, hidden]; the last layer then attends, projects and runs its MLP for those positions alone (the
        others' outputs there feed nothing), which is exact row by row.
        """
        b, s, h = inputs_embeds.shape
        rope = self.rotary_emb(position_ids)
        rope_b = rope[1] if len(rope) == 2 else None
        x = inputs_embeds.reshape(b * s, h)
        keep = int(keep_last) if 0 < int(keep_last) < s else None
        kv = []
        for i, layer in enumerate(self.layers):
            x, k, v = self.layer_step(x, rope[0], rope_b, mask, *layer.weights(),
                                      keep if i == len(self.layers) - 1 else None)
            if keep_kv:
                kv += [k, v]
        return self.norm(x).reshape(b, s if keep is None else keep, h), tuple(kv)


def last_positions(x, n, axis):
    """The last n entries of x along axis (a Slice kernel)."""
    return split(x, (x.shape[axis] - n, n), axis)[1]
