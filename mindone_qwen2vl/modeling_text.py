"""Qwen2 decoder with multimodal rotary embedding (M-RoPE): `model.*` of the HF checkpoint."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import decoder_attention
from .config import Qwen2VLTextConfig
from .layers import Embedding, Linear, RMSNorm, apply_rotary
from .precision import PrecisionPolicy


class Qwen2VLRotaryEmbedding(nn.Cell):
    """cos/sin [B, S, head_dim] from 3-axis positions [3, B, S].

    M-RoPE gives the frequencies in `mrope_section` to the temporal, height and width positions in turn
    (e.g. 16/24/24 of the 64 frequencies of the 2B model). Selecting each frequency's position first and then
    multiplying equals taking the per-axis tables and slicing them, with a third of the work.
    """

    def __init__(self, config: Qwen2VLTextConfig):
        super().__init__()
        dim = config.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
        axis = np.repeat(np.arange(3), config.mrope_section)
        self.inv_freq = Tensor(inv_freq)
        self.axis_onehot = Tensor((np.arange(3)[:, None] == axis[None, :]).astype(np.float32)[:, None, None, :])

    def construct(self, position_ids):
        pos = position_ids.astype(ms.float32).expand_dims(-1)  # [3, B, S, 1]
        # Exactly one of the three terms is non-zero for each frequency, so the sum is exact.
        freqs = (pos * self.axis_onehot).sum(0) * self.inv_freq  # [B, S, dim/2]
        emb = ops.cat((freqs, freqs), -1)
        return ops.cos(emb), ops.sin(emb)


class Qwen2MLP(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, dtype=ms.float32):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False, dtype=dtype)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False, dtype=dtype)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2VLAttention(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        dtype = policy.compute_dtype
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=True, dtype=dtype)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=True, dtype=dtype)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=True, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False, dtype=dtype)

    def construct(self, x, cos, sin, mask, cache=None, cache_position=None):
        """cache: None, or a cache.LayerKVCache that stores this call's keys/values at cache_position [S]
        and returns the whole cache to attend over (mask then covers the cache length)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        cos = cos.expand_dims(1)
        sin = sin.expand_dims(1)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, cache_position)
        out = decoder_attention(q, k, v, mask, self.scale, self.attn_implementation, self.flash_dtype)
        return self.o_proj(out)


class Qwen2VLDecoderLayer(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.self_attn = Qwen2VLAttention(config, policy)
        self.mlp = Qwen2MLP(config, policy.compute_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def construct(self, x, cos, sin, mask, cache=None, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2VLTextModel(nn.Cell):
    """Embedding, decoder layers and final norm. `construct` takes embeddings (vision already merged)."""

    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=policy.compute_dtype)
        self.layers = nn.CellList([Qwen2VLDecoderLayer(config, policy) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2VLRotaryEmbedding(config)

    def construct(self, inputs_embeds, position_ids, mask, caches=None, cache_position=None):
        """caches: None, or the per-layer KV caches (cache.StaticCache.layers) written at cache_position."""
        cos, sin = self.rotary_emb(position_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if caches is None else caches[i], cache_position)
        return self.norm(x)
