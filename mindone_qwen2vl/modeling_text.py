"""Qwen2 decoder with multimodal rotary embedding (M-RoPE): `model.*` of the HF checkpoint.

A decoder layer is written once, in two halves that take its weights as a bundle (DecoderLayerWeights):
`project` (norm, q/k/v projection, rotary) and `attend` (attention over the given keys, output projection,
MLP). Two loops run the layers:
- a prompt (`Qwen2VLTextModel.prompt`) loops on the host over two steps shared by every layer and compiled
  once for any batch and length (graphs.Step); the host splits long prompts' queries into blocks;
- a decode step (`Qwen2VLTextModel.construct`, compiled whole by generation.DecodeOneToken) loops in the
  graph, each layer with its own parameters, writing its keys and values to the cache.
"""
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import attention
from .attention import (CAUSAL_BLOCKS, MASK_MIN, causal_blocks, causal_edges, causal_prompt_attention,
                        decode_attention, flash_kernel, fused_causal_attention, prompt_attention, query_blocks)
from .config import Qwen2VLTextConfig
from .graphs import Step, dynamic, like
from .kernels import PortableKernels, kernels_for, rotate_half_matrix, split
from .layers import Embedding, Linear, RMSNorm, layer_arguments
from .precision import PrecisionPolicy


class Qwen2VLRotaryEmbedding(nn.Cell):
    """Rotary tables (cos, sin) [B*S, heads + 2 * kv heads, head_dim] from 3-axis positions [3, B, S], one row per
    head of the q, k and v projections side by side.

    M-RoPE gives the frequencies in `mrope_section` to the temporal, height and width positions in turn
    (e.g. 16/24/24 of the 64 frequencies of the 2B model). Selecting each frequency's position first and then
    multiplying equals taking the per-axis tables and slicing them, with a third of the work.

    The per-head rows let a layer rotate q and k and pass v in one pass over its qkv output: query rows carry
    the attention scale (applied once per step here rather than to every layer's scores), key rows are the
    plain tables, value rows are cos 1 and sin 0 (x * 1 + y * 0 == x exactly).
    """

    def __init__(self, config: Qwen2VLTextConfig):
        super().__init__()
        dim = config.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
        axis = np.repeat(np.arange(3), config.mrope_section)
        self.head_dim = dim
        self.inv_freq = Tensor(inv_freq)
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
        return ops.cos(emb) * self.factor + self.value_cos, ops.sin(emb) * self.factor


class DecoderLayerWeights(NamedTuple):
    """A layer's tensors by name, the checkpoint's own. In graphs they travel as a plain tuple in this order:
    MindSpore's graph mode treats a NamedTuple as an opaque Python object, so the code unpacks by position."""

    input_norm: Tensor
    q_weight: Tensor
    q_bias: Tensor
    k_weight: Tensor
    k_bias: Tensor
    v_weight: Tensor
    v_bias: Tensor
    o_weight: Tensor
    post_norm: Tensor
    gate_weight: Tensor
    up_weight: Tensor
    down_weight: Tensor


class Qwen2MLP(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        inter = config.intermediate_size
        self.kernels = kernels
        self.gate_proj = Linear(config.hidden_size, inter, bias=False, dtype=dtype)
        self.up_proj = Linear(config.hidden_size, inter, bias=False, dtype=dtype)
        self.down_proj = Linear(inter, config.hidden_size, bias=False, dtype=dtype)

    def construct(self, x, gate_weight, up_weight, down_weight):
        gate, up = self.gate_proj(x, gate_weight, None), self.up_proj(x, up_weight, None)
        return self.down_proj(self.kernels.swiglu(gate, up), down_weight, None)


class Qwen2VLAttention(nn.Cell):
    """The q/k/v and output projections (HF names and shapes) and the head layout."""

    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dtype = policy.compute_dtype
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=True, dtype=dtype)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=True, dtype=dtype)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=True, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False, dtype=dtype)


class Qwen2VLDecoderLayer(nn.Cell):
    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        kernels = kernels_for(policy)
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        self.flash_kernel = flash_kernel(policy)
        self.self_attn = Qwen2VLAttention(config, policy)
        self.mlp = Qwen2MLP(config, policy.compute_dtype, kernels)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, kernels=kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, kernels=kernels)
        self.rotate_half = Tensor(rotate_half_matrix(config.head_dim))
        self.matmul = ops.MatMul()

    def weights(self):
        """The layer's Parameters in DecoderLayerWeights' order, as a plain tuple (in a graph a NamedTuple is
        an opaque object)."""
        attn, mlp = self.self_attn, self.mlp
        return (self.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight,
                self.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)

    def project(self, x, cos, sin, w, heads_first=True):
        """x [T, hidden] -> q [H, T, D] (rotated, scaled), k, v [KVH, T, D] (k rotated); [T, heads, D] each with
        heads_first=False. Rotary in float32 whatever the compute dtype (the angles lose bits in fp16).
        w: DecoderLayerWeights (or a tuple)."""
        input_norm, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias = w[:7]
        attn = self.self_attn
        heads, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        h = self.input_layernorm(x, input_norm)
        # One [T, (heads + 2 kv) * D] tensor: the rotary below treats q, k and v in one pass.
        qkv = ops.cat((attn.q_proj(h, q_weight, q_bias), attn.k_proj(h, k_weight, k_bias),
                       attn.v_proj(h, v_weight, v_bias)), 1).astype(ms.float32)
        n = heads + 2 * kv
        rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(-1, n, d)
        qkv = (qkv.reshape(-1, n, d) * cos + rotated * sin).astype(x.dtype)
        if heads_first:
            return split(qkv.transpose(1, 0, 2), (heads, kv, kv), 0, 3)
        return split(qkv, (heads, kv, kv), 1, 3)

    def finish(self, x, attn_out, w):
        """The rest of the layer: x [T, hidden] and its attention output [T, H * D] -> [T, hidden].
        w: DecoderLayerWeights (or a tuple)."""
        o_weight, post_norm, gate_weight, up_weight, down_weight = w[7:]
        x = x + self.self_attn.o_proj(attn_out, o_weight, None)
        return x + self.mlp(self.post_attention_layernorm(x, post_norm), gate_weight, up_weight, down_weight)

    def construct(self, x, cos, sin, mask, cache, cache_rows):
        """A decode step: x [B, hidden] of one position per row, whose keys and values [B, KVH, D] the cache
        (cache.LayerKVCache) stores at cache_rows [B, KVH] before attending over all of it (mask [B, 1, 1, L])."""
        w = self.weights()
        q, k, v = self.project(x, cos, sin, w, heads_first=False)
        keys, values = cache.update(k, v, cache_rows)
        out = decode_attention(q, keys, values, mask, self.attn_implementation, self.flash_dtype, self.flash_kernel)
        return self.finish(x, out, w)


# ---------------------------------------------------------------------------------------------- prompt steps
class DecoderProjectStep(Step):
    """`Qwen2VLDecoderLayer.project` with a layer's weights as arguments: one graph for every layer and every
    prompt length.

    In GRAPH_MODE each compiled graph keeps its own workspace for as long as it lives, and a graph of all the
    layers holds every layer's: a 2000-token prompt at the 2B widths grew RSS by about 1 GB per layer. The steps
    hold one layer's. They compute with the first layer's cells (their head counts, attention backend and,
    under tensor parallelism, their all-reduce), never with its parameters.
    """

    def __init__(self, layer: Qwen2VLDecoderLayer, rotary_rows):
        super().__init__()
        self.layer = layer
        self.rotary_rows = rotary_rows  # heads + 2 * kv heads of this process

    def specs(self):
        w = DecoderLayerWeights(*self.layer.weights())
        d = self.layer.self_attn.head_dim
        return (dynamic((None, w.o_weight.shape[0]), w.q_weight.dtype), dynamic((None, self.rotary_rows(), d)),
                dynamic((None, self.rotary_rows(), d)), *like(w))

    def construct(self, x, cos, sin, *weights):
        return self.layer.project(x, cos, sin, weights)


class DecoderAttendStep(Step):
    """Attention and the rest of the layer for the positions `rows` [Sq] of one sequence, over all its keys;
    q, k, v heads first as `project` gives them: one graph for every layer, prompt length and query block.

    mask: additive float32 [H, Sq, S], one per query head (per_head_mask), or [1, Sq, S] broadcast over the
    heads in the graph. A per-head mask is built once per prompt and serves every layer: on the CPU backend
    broadcasting a [1417, 1417] mask to 4 heads took 4.5 ms of a 37 ms step, at every layer.

    blocks > 1: the positions attend in that many causal blocks (attention.causal_prompt_attention); the
    arguments after `rows` are then (rows, keys, mask) per block instead of one mask. blocks == 0: the fused
    CPU kernel ("sdpa"), which needs no mask: `rows` are the queries' positions.
    """

    def __init__(self, layer: Qwen2VLDecoderLayer, per_head_mask: bool, blocks=1):
        super().__init__()
        self.layer = layer
        self.per_head_mask = per_head_mask
        self.blocks = blocks
        self.kv_index = None

    def specs(self):
        w = DecoderLayerWeights(*self.layer.weights())
        attn = self.layer.self_attn
        # The KV head of each query head, for this process's heads (fewer under tensor parallelism).
        self.kv_index = Tensor(np.arange(attn.num_heads, dtype=np.int32) // (attn.num_heads // attn.num_kv_heads))
        dtype, d = w.q_weight.dtype, attn.head_dim
        kv = dynamic((attn.num_kv_heads, None, d), dtype)
        rows = dynamic((None,), ms.int32)
        mask = dynamic((attn.num_heads if self.per_head_mask else 1, None, None))
        masks = () if self.blocks == 0 else (mask,) if self.blocks == 1 else (rows, rows, mask) * self.blocks
        return (dynamic((None, w.o_weight.shape[0]), dtype), dynamic((attn.num_heads, None, d), dtype), kv, kv,
                rows, *masks, *like(w))

    def construct(self, x, q, k, v, rows, *rest):
        layer = self.layer
        if self.blocks == 0:
            weights = rest
            out = fused_causal_attention(ops.gather(q, rows, 1), k, v, rows, layer.flash_kernel)
        elif self.blocks == 1:
            mask, weights = rest[0], rest[1:]
            out = prompt_attention(ops.gather(q, rows, 1), k, v, mask, self.kv_index, layer.attn_implementation,
                                   layer.flash_dtype, layer.flash_kernel, self.per_head_mask)
        else:
            n = 3 * self.blocks
            blocks = tuple(rest[i:i + 3] for i in range(0, n, 3))
            weights = rest[n:]
            out = causal_prompt_attention(q, k, v, blocks, self.kv_index, self.per_head_mask)
        return layer.finish(ops.gather(x, rows, 0), out, weights)


class DecoderPromptLayerStep(Step):
    """A whole decoder layer over a prompt as the two CPU kernels of csrc/prompt.cc (Qwen2VLTextModel.prompt_kernels
    says when they apply): x [T, hidden], the rotary tables, the positions `rows` [Sq] whose outputs are wanted
    -> (their hidden states [Sq, hidden], the layer's keys and values [KVH, T, D]). One graph for every layer
    and prompt length, of four operators where the backend's own kernels make about 35."""

    def __init__(self, layer: Qwen2VLDecoderLayer, rotary_rows, eps):
        super().__init__()
        self.layer = layer
        self.rotary_rows = rotary_rows
        self.eps = Tensor(np.array([eps], np.float32))

    def specs(self):
        w = DecoderLayerWeights(*self.layer.weights())
        d = self.layer.self_attn.head_dim
        table = dynamic((None, self.rotary_rows(), d))
        return (dynamic((None, w.o_weight.shape[0])), table, table, dynamic((None,), ms.int32), *like(w))

    def construct(self, x, cos, sin, rows, *weights):
        kernels, attn = self.layer.flash_kernel, self.layer.self_attn
        qkv = kernels.prompt_project(x, cos, sin, *weights[:7], self.eps)
        out = kernels.prompt_attend(x, qkv, rows, *weights[7:], self.eps)
        h, kv = attn.num_heads, attn.num_kv_heads
        return out, qkv[h:h + kv], qkv[h + kv:]


class EmbedStep(Step):
    """Token ids [S] -> embeddings [S, hidden], any length."""

    def __init__(self, text_model):
        super().__init__()
        # The model as a plain attribute, its embedding looked up when the graph compiles: tensor parallelism
        # (parallel.shard_model) replaces the embedding after the model is built.
        object.__setattr__(self, "text", text_model)

    def specs(self):
        return (dynamic((None,), ms.int32),)

    def construct(self, ids):
        return self.text.embed_tokens(ids)


class RotaryStep(Step):
    """Positions [3, 1, S] of one sequence -> the rotary tables of every layer, any length."""

    def __init__(self, rotary):
        super().__init__()
        self.rotary = rotary

    def specs(self):
        return (dynamic((3, 1, None), ms.int32),)

    def construct(self, position_ids):
        return self.rotary(position_ids)


class Qwen2VLTextModel(nn.Cell):
    """Embedding, decoder layers and final norm. Between the layers the hidden states are [B*S, hidden]: every
    projection is then a plain 2-D matmul."""

    def __init__(self, config: Qwen2VLTextConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.policy = policy
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=policy.compute_dtype)
        self.layers = nn.CellList([Qwen2VLDecoderLayer(config, policy) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, kernels=kernels_for(policy))
        self.rotary_emb = Qwen2VLRotaryEmbedding(config)
        # Plain attributes: registered sub-cells would prefix the parameter names of the cells they hold.
        steps = dict(embed=EmbedStep(self), rotary=RotaryStep(self.rotary_emb),
                     project=DecoderProjectStep(self.layers[0], self.rotary_rows),
                     attend=DecoderAttendStep(self.layers[0], per_head_mask=True),
                     attend_shared_mask=DecoderAttendStep(self.layers[0], per_head_mask=False))
        n = CAUSAL_BLOCKS
        steps[f"attend.{n}"] = DecoderAttendStep(self.layers[0], per_head_mask=True, blocks=n)
        steps[f"attend_shared_mask.{n}"] = DecoderAttendStep(self.layers[0], per_head_mask=False, blocks=n)
        if policy.attn_implementation == "sdpa":
            steps["attend_fused"] = DecoderAttendStep(self.layers[0], per_head_mask=False, blocks=0)
            steps["layer_fused"] = DecoderPromptLayerStep(self.layers[0], self.rotary_rows, config.rms_norm_eps)
        object.__setattr__(self, "steps", steps)
        self.tensor_parallel = None  # (rank, size) on a rank of an msrun job (parallel.shard_model)

    def prompt_kernels(self):
        """The CPU kernels that run a prompt's decoder layer as two operators (csrc/prompt.cc), or None where they
        do not apply: they come with the "sdpa" attention of the CPU backend, compute in float32, need oneDNN's
        sgemm from MindSpore's backend for their products, and know nothing of tensor parallelism."""
        kernels = attention.layer_kernels(self.policy)
        return kernels if kernels is not None and kernels.layers_ready and not self.tensor_parallel else None

    def rotary_rows(self):
        attn = self.layers[0].self_attn
        return attn.num_heads + 2 * attn.num_kv_heads

    def construct(self, inputs_embeds, position_ids, mask, caches, cache_rows):
        """A decode step: inputs_embeds [B, hidden], position_ids [3, B, 1], mask additive [B, 1, 1, L];
        caches: the per-layer KV caches (cache.StaticCache.layers), written at cache_rows
        (cache.StaticCache.rows) -> normed hidden states [B, hidden]."""
        cos, sin = self.rotary_emb(position_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, caches[i], cache_rows)
        return self.norm(x)

    def prompt(self, inputs_embeds, position_ids, keep_last=0, keep_kv=False):
        """One whole sequence (forward, generate's prefill, one row at a time), layer by layer on the host
        through the shared steps.

        inputs_embeds [S, hidden] Tensor, position_ids [3, S] int numpy; causal attention. keep_last=n
        (0 < n < S): the last layer computes only the last n positions (the others' outputs feed nothing
        there), so the result holds those. keep_kv: also return every layer's keys and values [KVH, S, D]
        (k0, v0, k1, v1, ...), for the cache. Returns (hidden [S or n, hidden] before the final norm, kv tuple).
        """
        s = inputs_embeds.shape[0]
        cos, sin = self.steps["rotary"](Tensor(np.asarray(position_ids, np.int32).reshape(3, 1, s)))
        keep = int(keep_last) if 0 < int(keep_last) < s else s
        x, kv = inputs_embeds, []
        if self.prompt_kernels() is not None:
            every, last = Tensor(np.arange(s, dtype=np.int32)), Tensor(np.arange(s - keep, s, dtype=np.int32))
            for i, arguments in enumerate(layer_arguments(self, self.layers)):
                rows = last if i == len(self.layers) - 1 else every
                x, k, v = self.steps["layer_fused"](x, cos, sin, rows, *arguments())
                if keep_kv:
                    kv += [k, v]
            return x, tuple(kv)
        heads, impl = self.layers[0].self_attn.num_heads, self.policy.attn_implementation
        every = query_blocks(s, s, heads, impl)
        last = [(s - keep + a, s - keep + z) for a, z in query_blocks(keep, s, heads, impl)]
        calls = {(a, z): causal_blocks(z - a, z, heads, impl) for a, z in every + last}  # -> blocks in the call

        def parts(a, z, n):  # [(query range, keys attended)] of the n blocks of a call over the queries a..z-1
            return [((a, z), s)] if n == 1 else [((b, e), e) for b, e in causal_edges(a, z, n)]

        # Masks for every head when those of all the calls fit the attention budget (eager attention only).
        per_head = impl == "eager" and \
            sum(heads * (e - b) * m * 4 for call, n in calls.items() for (b, e), m in parts(*call, n)) <= \
            attention.SCORES_BUDGET

        def call_args(a, z, n, per_head):  # host inputs of a call over the queries a..z-1 in n blocks
            args = [Tensor(np.arange(a, z, dtype=np.int32))]
            for (b, e), m in parts(a, z, n):
                mask = np.where(np.arange(m)[None, :] <= np.arange(b, e)[:, None], 0.0, MASK_MIN)
                mask = np.broadcast_to(mask.astype(np.float32), (heads if per_head else 1, e - b, m))
                if n > 1:
                    args += [Tensor(np.arange(b, e, dtype=np.int32)), Tensor(np.arange(m, dtype=np.int32))]
                args.append(Tensor(np.ascontiguousarray(mask)))
            return args

        made = {}

        def inputs(a, z):  # the attend step of the queries a..z-1 and its host inputs, made once per prompt
            if (a, z) not in made and impl == "sdpa":
                made[a, z] = (self.steps["attend_fused"], [Tensor(np.arange(a, z, dtype=np.int32))])
            if (a, z) not in made:
                n = calls[a, z]
                name = ("attend" if per_head else "attend_shared_mask") + ("" if n == 1 else f".{n}")
                made[a, z] = (self.steps[name], call_args(a, z, n, per_head))
            return made[a, z]

        # The first prompt long enough for causal blocks also compiles their step (run once, its result unused),
        # so that the first long prompt later does not pay that compilation: in the mixed stream it made the 3rd
        # request three times the median.
        warm = None
        causal = self.steps[f"attend.{CAUSAL_BLOCKS}"]
        if impl == "eager" and s >= CAUSAL_BLOCKS and ms.get_context("mode") == ms.GRAPH_MODE and \
                causal.compiled() == 0 and CAUSAL_BLOCKS not in calls.values():
            warm = (causal, call_args(0, s, CAUSAL_BLOCKS, True))

        for i, arguments in enumerate(layer_arguments(self, self.layers)):
            w = arguments()
            q, k, v = self.steps["project"](x, cos, sin, *w)
            if warm is not None:
                warm[0](x, q, k, v, *warm[1], *w)
                warm = None
            outs = []
            for a, z in (last if i == len(self.layers) - 1 else every):
                attend, args = inputs(a, z)
                outs.append(attend(x, q, k, v, *args, *w))
            x = outs[0] if len(outs) == 1 else ops.cat(outs, 0)
            if keep_kv:
                kv += [k, v]
        return x, tuple(kv)

    def graphs(self):
        return self.steps
