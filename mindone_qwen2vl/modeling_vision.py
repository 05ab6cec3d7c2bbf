"""Qwen2-VL vision tower: patch embedding, 2-D rotary, per-frame attention blocks, 2x2 PatchMerger.

Everything that depends on the image sizes (rotary positions, which patches attend to which, how queries are
split into blocks) is computed on the host in numpy by `vision_plan` and enters the graphs as index tensors.
The steps are declared with dynamic shapes (graphs.Step): one compilation serves every image size, frame
layout and number of images.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import flash_kernel, frame_attention, query_blocks
from .config import Qwen2VLVisionConfig
from .graphs import Step, dynamic, like
from .kernels import PortableKernels, broadcast, kernels_for, rotate_half_matrix, split
from .layers import LayerNorm, Linear, as_arguments, new_param
from .precision import PrecisionPolicy


# ---------------------------------------------------------------------------------------------- host plan
@dataclass
class VisionPlan:
    """Host-side tables for one call of the tower.

    Attention never crosses a frame. Frames of the same length are batched: each group is [F, L] patch indices
    (`groups[g]`, rows of the tower's input), so attention runs on a [F, heads, L, L] batch with no padding
    and no mask. Query positions are split into blocks (`blocks[g]`) when a group's eager scores would not fit
    attention.SCORES_BUDGET. `unpad` takes the rows of the concatenated outputs (group by group, block by
    block, each [F, block]) back to patch order; None when they are in patch order already.
    """

    rot_pos: np.ndarray  # [N, 2] int32: (row, col) of each patch, patches in 2x2 merge-window order
    groups: List[np.ndarray]  # [F, L] int32 per frame length
    blocks: List[List[Tuple[int, int]]]  # query position ranges within the frames of each group
    unpad: Optional[np.ndarray]  # [N] int32


def _merge_window_positions(h, w, merge):
    # Patches arrive from the processor grouped by 2x2 merge window: window row, window col, row, col.
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    rows = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def vision_plan(grid_thw, spatial_merge_size=2, num_heads=1, impl="eager") -> VisionPlan:
    """Rotary positions, the per-frame attention groups and their query blocks for the given grids."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    for t, h, w in grid_thw:
        if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"grid_thw row {[int(t), int(h), int(w)]}: t, h and w must be >= 1, h and w multiples "
                             f"of {spatial_merge_size}")
    rot_pos = np.concatenate(
        [np.tile(_merge_window_positions(h, w, spatial_merge_size), (t, 1)) for t, h, w in grid_thw]
    ).astype(np.int32)
    frame_lens = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    starts = np.concatenate([[0], np.cumsum(frame_lens)[:-1]])
    groups, blocks, order = [], [], []
    for length in sorted(set(frame_lens.tolist())):
        rows = starts[frame_lens == length][:, None] + np.arange(length)[None, :]
        groups.append(rows.astype(np.int32))
        blocks.append(query_blocks(length, length, len(rows) * num_heads, impl))
        order += [rows[:, a:b].reshape(-1) for a, b in blocks[-1]]
    order = np.concatenate(order)
    in_order = len(order) == len(rot_pos) and (order == np.arange(len(order))).all()
    unpad = None if in_order else np.argsort(order, kind="stable").astype(np.int32)
    return VisionPlan(rot_pos, groups, blocks, unpad)


# ---------------------------------------------------------------------------------------------- cells
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

    The q rows carry the attention scale and the v rows are cos 1, sin 0, so one pass over the qkv projection
    rotates q and k, scales q, and leaves v unchanged (x * 1 + y * 0 == x exactly).
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
        row, col = split(rot_pos.astype(ms.float32), (1, 1), 1, 2)
        freqs = ops.cat((row * self.inv_freq, col * self.inv_freq), -1)
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, 1, self.head_dim)
        return ops.cos(emb) * self.factor + self.value_cos, ops.sin(emb) * self.factor


class VisionBlockWeights(NamedTuple):
    """A block's tensors by name. In graphs they travel as a plain tuple in this order: MindSpore's graph mode
    treats a NamedTuple as an opaque Python object, so the code unpacks by position."""

    norm1_weight: Tensor
    norm1_bias: Tensor
    qkv_weight: Tensor
    qkv_bias: Tensor
    proj_weight: Tensor
    proj_bias: Tensor
    norm2_weight: Tensor
    norm2_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor


class VisionAttention(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32):
        super().__init__()
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim, bias=True, dtype=dtype)
        self.proj = Linear(config.embed_dim, config.embed_dim, bias=True, dtype=dtype)


class VisionMlp(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        self.kernels = kernels
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden, dtype=dtype)
        self.fc2 = Linear(hidden, config.embed_dim, dtype=dtype)

    def construct(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        h = self.fc1(x, fc1_weight, fc1_bias)
        return self.fc2(self.kernels.quick_gelu(h), fc2_weight, fc2_bias)


class Qwen2VLVisionBlock(nn.Cell):
    """One block under HF's names. Its two halves, `project` and `attend`, take the weights as a bundle so that
    one compiled step (VisionBlockStep) runs every block."""

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        self.flash_kernel = flash_kernel(policy)
        self.norm1 = LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config, policy.compute_dtype)
        self.mlp = VisionMlp(config, policy.compute_dtype, kernels_for(policy))
        self.rotate_half = Tensor(rotate_half_matrix(self.head_dim))
        self.matmul = ops.MatMul()

    def weights(self):
        """The block's Parameters in VisionBlockWeights' order, as a plain tuple (in a graph a NamedTuple is
        an opaque object)."""
        return (self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias,
                self.attn.proj.weight, self.attn.proj.bias, self.norm2.weight, self.norm2.bias,
                self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias)

    def project(self, x, cos, sin, w):
        """x [N, E] -> q, k, v heads first [H, N, D], q and k rotated (in float32 whatever the compute dtype),
        q scaled. w: VisionBlockWeights (or the same tensors as a tuple)."""
        norm1_weight, norm1_bias, qkv_weight, qkv_bias = w[:4]
        heads, d = self.num_heads, self.head_dim
        qkv = self.attn.qkv(self.norm1(x, norm1_weight, norm1_bias), qkv_weight, qkv_bias)
        qkv = qkv.astype(ms.float32)
        rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(-1, 3, heads, d)
        qkv = qkv.reshape(-1, 3, heads, d)
        qkv = qkv * broadcast(cos, qkv) + rotated * broadcast(sin, qkv)
        q, k, v = split(qkv.astype(x.dtype).transpose(1, 2, 0, 3), (1, 1, 1), 0, 4)
        return q.reshape(heads, -1, d), k.reshape(heads, -1, d), v.reshape(heads, -1, d)

    def attend(self, x, q, k, v, w):
        """The rest of the block for some rows: x [F * Lq, E] and their queries q [H, F, Lq, D] against their
        frames' keys and values k, v [H, F, L, D] -> [F * Lq, E]. w: VisionBlockWeights (or a tuple)."""
        proj_weight, proj_bias, norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = w[4:]
        out = frame_attention(q, k, v, self.attn_implementation, self.flash_dtype, self.flash_kernel)
        x = x + self.attn.proj(out, proj_weight, proj_bias)
        return x + self.mlp(self.norm2(x, norm2_weight, norm2_bias), fc1_weight, fc1_bias, fc2_weight, fc2_bias)


class VisionProjectStep(Step):
    """`Qwen2VLVisionBlock.project` with the block's weights as arguments: one graph for every block and every
    image size.

    In GRAPH_MODE each compiled graph keeps its own workspace for as long as it lives: the 32-block tower as one
    graph held +11.5 GB for one 1024-patch image at the 2B widths; steps shared by every block hold one block's.
    """

    def __init__(self, block: Qwen2VLVisionBlock):
        super().__init__()
        self.block = block

    def specs(self):
        b = self.block
        d = b.head_dim
        return (dynamic((None, b.attn.proj.out_features), b.attn.qkv.weight.dtype), dynamic((None, 3, 1, d)),
                dynamic((None, 3, 1, d)), *like(b.weights()))

    def construct(self, x, cos, sin, *weights):
        return self.block.project(x, cos, sin, weights)


class VisionAttendStep(Step):
    """`Qwen2VLVisionBlock.attend` for the query rows `rows` [F, Lq] against the keys of `frames` [F, L]
    (patch indices, see VisionPlan): one graph for every block, image size and frame layout."""

    def __init__(self, block: Qwen2VLVisionBlock):
        super().__init__()
        self.block = block

    def specs(self):
        b = self.block
        dtype = b.attn.qkv.weight.dtype
        index = dynamic((None, None), ms.int32)
        heads = dynamic((b.num_heads, None, b.head_dim), dtype)
        return (dynamic((None, b.attn.proj.out_features), dtype), heads, heads, heads, index, index,
                *like(b.weights()))

    def construct(self, x, q, k, v, rows, frames, *weights):
        # Gathers by [F, Lq] / [F, L] index tensors give the frame layout directly: no reshape that would depend
        # on the dynamic sizes (each costs host-side shape arithmetic at every call of a dynamic graph).
        x = ops.gather(x, rows, 0).reshape(-1, x.shape[1])
        q, k, v = ops.gather(q, rows, 1), ops.gather(k, frames, 1), ops.gather(v, frames, 1)
        return self.block.attend(x, q, k, v, weights)


class VisionEmbed(Step):
    """Patches and their positions -> the first block's input and the rotary tables: one graph, any N."""

    def __init__(self, patch_embed: PatchEmbed, rotary: VisionRotaryEmbedding):
        super().__init__()
        self.patch_embed = patch_embed
        self.rotary = rotary

    def specs(self):
        return dynamic((None, self.patch_embed.patch_dim), ms.float32), dynamic((None, 2), ms.int32)

    def construct(self, pixels, rot_pos):
        cos, sin = self.rotary(rot_pos)
        return self.patch_embed(pixels), cos, sin


class MergerStep(Step):
    """The PatchMerger as one graph for any number of patches."""

    def __init__(self, merger):
        super().__init__()
        self.merger = merger

    def specs(self):
        ln = self.merger.ln_q.weight
        return (dynamic((None, ln.shape[0]), self.merger.mlp[0].weight.dtype),)

    def construct(self, x):
        return self.merger(x)


class GELU(nn.Cell):
    """The exact GELU as a cell (the merger's `mlp` is a sequence: HF's mlp.0 / mlp.2 names)."""

    def __init__(self, kernels):
        super().__init__()
        self.kernels = kernels

    def construct(self, x):
        return self.kernels.gelu(x)


class PatchMerger(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        self.hidden = config.embed_dim * config.spatial_merge_size ** 2
        self.ln_q = LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.SequentialCell(
            [
                Linear(self.hidden, self.hidden, dtype=dtype),
                GELU(kernels),
                Linear(self.hidden, config.hidden_size, dtype=dtype),
            ]
        )

    def construct(self, x):
        # Consecutive rows are one 2x2 window (the processor's patch order), so a reshape merges them.
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


class Qwen2VisionTransformer(nn.Cell):
    """`visual.*` of the HF checkpoint. Call with the processor's flattened patches and their grids.

    Not one graph: the embedding, each block (two steps shared by every block) and the merger run as separate
    graphs in GRAPH_MODE, each compiled once whatever the image sizes.
    """

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.policy = policy
        self.patch_embed = PatchEmbed(config, policy.conv_dtype, policy.compute_dtype)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim)
        self.blocks = nn.CellList([Qwen2VLVisionBlock(config, policy) for _ in range(config.depth)])
        self.merger = PatchMerger(config, policy.compute_dtype, kernels_for(policy))
        # Steps computing with the first block's cells (never its parameters), as plain attributes: registered
        # sub-cells would prefix their own parameter names.
        steps = dict(embed=VisionEmbed(self.patch_embed, self.rotary_pos_emb),
                     project=VisionProjectStep(self.blocks[0]),
                     attend=VisionAttendStep(self.blocks[0]), merger=MergerStep(self.merger))
        object.__setattr__(self, "steps", steps)

    def plan(self, grid_thw) -> VisionPlan:
        return vision_plan(grid_thw, self.config.spatial_merge_size, self.config.num_heads,
                           self.policy.attn_implementation)

    def __call__(self, pixel_values, grid_thw):
        """pixel_values [N, C * T * P * P] (numpy or Tensor), grid_thw [images, 3] -> merged features."""
        plan = self.plan(grid_thw)
        pixels = pixel_values if isinstance(pixel_values, Tensor) else Tensor(np.asarray(pixel_values, np.float32))
        x, cos, sin = self.steps["embed"](pixels, Tensor(plan.rot_pos))
        calls = [(Tensor(np.ascontiguousarray(rows[:, a:b])), Tensor(rows))
                 for rows, blocks in zip(plan.groups, plan.blocks) for a, b in blocks]
        unpad = None if plan.unpad is None else Tensor(plan.unpad)
        project, attend = self.steps["project"], self.steps["attend"]
        for blk in self.blocks:
            w = as_arguments(blk.weights())
            q, k, v = project(x, cos, sin, *w)
            outs = [attend(x, q, k, v, query_rows, frames, *w) for query_rows, frames in calls]
            x = outs[0] if len(outs) == 1 else ops.cat(outs, 0)
            if unpad is not None:
                x = ops.gather(x, unpad, 0)
        return self.steps["merger"](x)
