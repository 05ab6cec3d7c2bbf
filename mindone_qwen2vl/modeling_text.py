"""Qwen2 decoder with multimodal rotary embedding (M-RoPE): `model.*` of the HF checkpoint."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import decoder_attention
from .config import Qwen2VLTextConfig
from .layers import Embedding, Linear, PackedLinear, RMSNorm, rotate_half_matrix, split
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
        gate, up = split(self.gate_up_proj(x), self.gate_up_proj.sizes, -1)
        return self.down_proj(ops.silu(gate) * up)


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
        b, s = mask.shape[0], mask.shape[2]
        heads, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # Rotary in float32 whatever the compute dtype (the angles lose bits in fp16), q, k and v in one pass.
        qkv = self.qkv_proj(x).astype(ms.float32)
        n = heads + 2 * kv
        if len(rope) == 1:
            qkv = self.bmm(qkv.reshape(-1, n, 1, d), rope[0]).reshape(-1, n, d)
        else:
            rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(-1, n, d)
            qkv = qkv.reshape(-1, n, d) * rope[0] + rotated * rope[1]
        q, k, v = split(qkv.astype(x.dtype), (heads, kv, kv), 1)
        k, v = k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)
        if cache is not None:
            k, v = cache.update(k, v, cache_rows)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = decoder_attention(q.reshape(b, s, heads, d), k, v, mask, self.attn_implementation, self.flash_dtype)
        return self.o_proj(out)


class Qwen2VLDecoderLayer(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.self_attn = Qwen2VLAttention(config, policy)
        self.mlp = Qwen2MLP(config, policy.compute_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def construct(self, x, rope, mask, cache=None, cache_rows=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


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
