"""Qwen2-VL vision tower: Conv3d patch embedding, 2-D rotary, per-frame attention blocks, 2x2 PatchMerger.

Everything that depends on the image sizes (rotary positions, which patches attend to which) is computed on
the host in numpy by `vision_plan` before the call, so the tower itself is shape-static per input and
compiles in graph mode.
"""
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import vision_attention
from .config import Qwen2VLVisionConfig
from .layers import LayerNorm, Linear, as_arguments, new_param, rotate_half_matrix, split
from .precision import NORM_DTYPE, PrecisionPolicy


@dataclass
class VisionPlan:
    """Host-side tables for one call of the tower (see `vision_plan`)."""

    rot_pos: np.ndarray  # [N, 2] int32: (row, col) of each patch, patches in 2x2 merge-window order
    frame_lens: np.ndarray  # [F] int64: patches per frame; attention never crosses a frame
    gather_idx: Optional[np.ndarray]  # [F * Lmax] int32 into the N patches, or None when all frames are equal
    key_bias: Optional[np.ndarray]  # [F, Lmax] float32: 0 for real keys, -inf-like for padding
    unpad_idx: Optional[np.ndarray]  # [N] int32 from the padded [F * Lmax] rows back to the patches

    @property
    def max_len(self):
        return int(self.frame_lens.max())

    @property
    def cu_seqlens(self):
        return np.concatenate([[0], np.cumsum(self.frame_lens)]).astype(np.int64)


def _merge_window_positions(h, w, merge):
    # Patches arrive from the processor grouped by 2x2 merge window: window row, window col, row, col.
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    rows = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def vision_plan(grid_thw, spatial_merge_size=2) -> VisionPlan:
    """Rotary positions and the block-diagonal (per frame) attention layout for the given grids."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    for t, h, w in grid_thw:
        if t < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"grid_thw row {[int(t), int(h), int(w)]}: t must be >= 1, h and w multiples of "
                             f"{spatial_merge_size}")
    rot_pos = np.concatenate(
        [np.tile(_merge_window_positions(h, w, spatial_merge_size), (t, 1)) for t, h, w in grid_thw]
    ).astype(np.int32)
    frame_lens = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    lmax = int(frame_lens.max())
    if (frame_lens == lmax).all():
        return VisionPlan(rot_pos, frame_lens, None, None, None)
    # Frames of different sizes: pad each to Lmax. Memory is F * Lmax^2 per head, the block diagonal only,
    # never (sum of frames)^2.
    n_frames = len(frame_lens)
    starts = np.concatenate([[0], np.cumsum(frame_lens)[:-1]])
    offs = np.arange(lmax)
    valid = offs[None, :] < frame_lens[:, None]
    gather_idx = np.where(valid, starts[:, None] + offs[None, :], 0).astype(np.int32).reshape(-1)
    key_bias = np.where(valid, 0.0, np.finfo(np.float32).min).astype(np.float32)
    unpad_idx = (np.arange(n_frames)[:, None] * lmax + offs[None, :])[valid].astype(np.int32)
    return VisionPlan(rot_pos, frame_lens, gather_idx, key_bias, unpad_idx)


class PatchProjection(nn.Cell):
    """The Conv3d of the checkpoint (weight [embed, C, 2, 14, 14], no bias), computed as a matmul.

    Its stride equals its kernel and each input is exactly one kernel-sized patch, so the convolution is
    one dot product per patch and output channel: a matmul against the weight flattened to [embed, C*2*14*14],
    in the same (C, T, H, W) order as the processor flattens patches. Measured on the CPU backend (graph
    mode): 7 ms against 910 ms for nn.Conv3d on 1024 patches, 34 ms against 9.5 s on 14308.
    """

    def __init__(self, in_channels, embed_dim, kernel, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((embed_dim, in_channels) + tuple(kernel), dtype)
        self.embed_dim = embed_dim
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, patches):
        return self.matmul(patches.astype(self.weight.dtype), self.weight.reshape(self.embed_dim, -1))


class PatchEmbed(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, out_dtype=ms.float32):
        # dtype: the policy's conv_dtype (bf16 on Ascend); out_dtype: its compute dtype, the blocks' input
        super().__init__()
        self.dtype = out_dtype
        self.patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = PatchProjection(config.in_channels, config.embed_dim, kernel, dtype)

    def construct(self, x):
        return self.proj(x.reshape(-1, self.patch_dim)).astype(self.dtype)


class VisionRotaryEmbedding(nn.Cell):
    """2-D rotary tables [N, 3, 1, head_dim] for the q/k/v rows of each patch: the first half of the frequencies
    follow the row, the second the column.

    As in the decoder (modeling_text.Qwen2VLRotaryEmbedding), the q rows carry the attention scale and the v
    rows are cos 1, sin 0, so one pass over the qkv projection rotates q and k and leaves v unchanged.
    """

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))
        self.head_dim = head_dim
        scale = np.float32(head_dim) ** np.float32(-0.5)
        self.factor = Tensor(np.array([scale, 1.0, 0.0], np.float32).reshape(1, 3, 1, 1))
        self.value_cos = Tensor(np.array([0.0, 0.0, 1.0], np.float32).reshape(1, 3, 1, 1))

    def construct(self, rot_pos):
        row, col = split(rot_pos.astype(ms.float32), (1, 1), 1)
        freqs = ops.cat((row * self.inv_freq, col * self.inv_freq), -1)
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, 1, self.head_dim)
        return ops.cos(emb) * self.factor + self.value_cos, ops.sin(emb) * self.factor


class VisionAttention(nn.Cell):
    """Parameters of a block's attention (HF names); VisionBlockStep computes it."""

    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32):
        super().__init__()
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim, bias=True, dtype=dtype)
        self.proj = Linear(config.embed_dim, config.embed_dim, bias=True, dtype=dtype)


class VisionMlp(nn.Cell):
    """Parameters of a block's QuickGELU MLP (HF names); VisionBlockStep computes it."""

    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden, dtype=dtype)
        self.fc2 = Linear(hidden, config.embed_dim, dtype=dtype)


class Qwen2VLVisionBlock(nn.Cell):
    """One block's parameters under HF's names, handed to the tower's shared VisionBlockStep."""

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.norm1 = LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config, policy.compute_dtype)
        self.mlp = VisionMlp(config, policy.compute_dtype)

    def weights(self):
        """The block's tensors in VisionBlockStep's argument order (values: plain tensors, not Parameters, so
        that one compiled step serves every block)."""
        params = (self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias,
                  self.attn.proj.weight, self.attn.proj.bias, self.norm2.weight, self.norm2.bias,
                  self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias)
        return as_arguments(params)


class VisionBlockStep(nn.Cell):
    """A vision block with its weights as arguments: one graph, compiled once, runs every block.

    In GRAPH_MODE each compiled graph keeps its own workspace for as long as it lives. The 32-block tower
    compiled as one graph held +11.5 GB for one 1024-patch image at the 2B widths (about 0.36 GB per block,
    measured by RSS); sharing one block graph holds one block's workspace, and compiles faster.
    """

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-6)
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.matmul = ops.MatMul()
        self.rotate_half = Tensor(rotate_half_matrix(self.head_dim))

    def layer_norm(self, x, weight, bias):
        return self.norm(x.astype(NORM_DTYPE), weight, bias)[0].astype(x.dtype)  # float32, as LayerNorm

    def linear(self, x, weight, bias):
        return self.matmul_t(x.astype(weight.dtype), weight) + bias

    def construct(self, x, cos, sin, frame_len, gather_idx, key_bias, unpad_idx, frame_ends, norm1_w, norm1_b,
                  qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b):
        n, heads, d = x.shape[0], self.num_heads, self.head_dim
        # Rotary in float32 whatever the compute dtype, q, k and v in one pass (see VisionRotaryEmbedding);
        # the split uses Slice: StridedSlice cost 0.5 s of a 1.8 s 2B-width encoder pass on the CPU backend.
        qkv = self.linear(self.layer_norm(x, norm1_w, norm1_b), qkv_w, qkv_b).astype(ms.float32)
        rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(n, 3, heads, d)
        qkv = (qkv.reshape(n, 3, heads, d) * cos + rotated * sin).astype(x.dtype)
        q, k, v = split(qkv, (1, 1, 1), 1)
        layout = (frame_len, gather_idx, key_bias, unpad_idx, frame_ends)
        out = vision_attention(q.reshape(n, heads, d), k.reshape(n, heads, d), v.reshape(n, heads, d), layout,
                               1.0, self.attn_implementation, self.flash_dtype)
        x = x + self.linear(out, proj_w, proj_b)
        h = self.linear(self.layer_norm(x, norm2_w, norm2_b), fc1_w, fc1_b)
        return x + self.linear(h * ops.sigmoid(1.702 * h), fc2_w, fc2_b)  # QuickGELU


class PatchMerger(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32):
        super().__init__()
        self.hidden = config.embed_dim * config.spatial_merge_size ** 2
        self.ln_q = LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.SequentialCell(
            [
                Linear(self.hidden, self.hidden, dtype=dtype),
                nn.GELU(approximate=False),
                Linear(self.hidden, config.hidden_size, dtype=dtype),
            ]
        )

    def construct(self, x):
        # Consecutive rows are one 2x2 window (the processor's patch order), so a reshape merges them.
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


class Qwen2VisionTransformer(nn.Cell):
    """`visual.*` of the HF checkpoint. Call with the processor's flattened patches and a `vision_plan`."""

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.policy = policy
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config, policy.conv_dtype, policy.compute_dtype)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim)
        self.blocks = nn.CellList([Qwen2VLVisionBlock(config, policy) for _ in range(config.depth)])
        self.block_step = VisionBlockStep(config, policy)
        self.merger = PatchMerger(config, policy.compute_dtype)

    def __call__(self, pixel_values, rot_pos, frame_len=None, gather_idx=None, key_bias=None, unpad_idx=None,
                 frame_ends=None):
        # Not one graph: the embedding, the rotary tables, each block (one shared compiled step, see
        # VisionBlockStep) and the merger run as separate graphs in GRAPH_MODE.
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary_pos_emb(rot_pos)
        for blk in self.blocks:
            x = self.block_step(x, cos, sin, frame_len, gather_idx, key_bias, unpad_idx, frame_ends, *blk.weights())
        return self.merger(x)

    def plan_inputs(self, grid_thw):
        """Host tables -> the arguments `construct` takes after the pixels."""
        plan = vision_plan(grid_thw, self.spatial_merge_size)
        return (Tensor(plan.rot_pos),) + attention_layout(plan, self.policy.attn_implementation)


def attention_layout(plan: VisionPlan, attn_implementation="eager"):
    """The per-frame layout as the tower's trailing arguments:
    (frame_len, gather_idx, key_bias, unpad_idx, frame_ends); see attention.vision_attention.

    Separate arguments, not one tuple: graph mode treats tensors inside a tuple argument as constants and
    would recompile for every new image.
    """
    if attn_implementation == "flash_attention_2":
        return (None, None, None, None, tuple(int(e) for e in plan.cu_seqlens[1:]))
    if plan.gather_idx is None:
        return (plan.max_len, None, None, None, None)
    return (None, Tensor(plan.gather_idx), Tensor(plan.key_bias), Tensor(plan.unpad_idx), None)
